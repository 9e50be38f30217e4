"""What every rule script does first, and the few pieces several scripts share.

Scripts import this before anything else: it sends all output to the rule's log, makes the
`sdxl` package beside the workflow importable (also inside a conda env), ends the job when the
snakemake above it is killed (no orphan trainer writing beside a rerun), turns an expected
failure into one `error: ...` line at the end of the log, and claims the GPUs the rule asked
for before torch is imported.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "job-fingerprint.txt"


def start(snakemake, gpus: int = 0):
    """Log to the rule's log file and claim `gpus` GPUs; returns the sdxl.devices.Claim.

    Progress bars (sdxl/progress.py) become plain lines in the log, and a sparse line per bar
    on snakemake's console (the stderr this job was started with).
    """
    console = os.fdopen(os.dup(2), "w", buffering=1)  # noqa: SIM115 -- open for the whole job
    log = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 -- open for the whole job
    os.dup2(log.fileno(), 1)  # also catches C-level output and child processes
    os.dup2(log.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    # The Hub's and transformers' bars would draw carriage returns into the log; the library
    # logs each file it fetches instead.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from sdxl.devices import claim_devices
    from sdxl.procs import watch_ancestors
    from sdxl.progress import show_on_console

    show_on_console(console, job_label(snakemake))
    sys.excepthook = _one_line_errors
    watch_ancestors()
    claim = claim_devices(gpus)
    logging.info(
        "rule %s on %s (%s)", snakemake.rule, ",".join(claim.devices) or "cpu", claim.source
    )
    return claim


def job_label(snakemake) -> str:
    """The job as the console names it: its rule and wildcards (`generate shard-1`)."""
    return " ".join([snakemake.rule, *(f"{k}-{v}" for k, v in snakemake.wildcards.items())])


def finish(snakemake, summary: str = "", outputs=None) -> None:
    """End the log with one line naming what the job wrote (`outputs`: default all of them).

    `wrote results/train/demo/lora_final.safetensors (LoRA rank 4, 12 steps)`; more than three
    files are named by their folder.
    """
    paths = [str(p) for p in (snakemake.output if outputs is None else outputs)]
    what = ", ".join(paths)
    if len(paths) > 3:
        what = f"{len(paths)} files in {os.path.commonpath(paths)}/"
    print(f"wrote {what}" + (f" ({summary})" if summary else ""), file=sys.stderr, flush=True)


def _one_line_errors(kind, err, tb) -> None:
    """An expected failure (bad input, missing file, ...) ends the log with one `error:` line.

    snakemake --show-failed-logs then shows the reason itself, not the end of a traceback.
    SDXL_DEBUG=1 keeps the traceback; anything unexpected (a bug) always keeps it.
    """
    from sdxl.errors import EXPECTED, report

    if not issubclass(kind, EXPECTED) or os.environ.get("SDXL_DEBUG"):
        sys.__excepthook__(kind, err, tb)
        return
    report(err)


def precision(claim, wanted: str) -> str:
    """The asked precision on GPU; fp32 on the CPU, where half precision is slow or missing."""
    return wanted if claim.torch_device == "cuda" else "fp32"


def job_fingerprint(snakemake, params: dict | None = None) -> str:
    """sha256 of the job's rule, wildcards, params (or `params`) and input files: equal means
    'same job'. Folders among the inputs are skipped; a manifest input summarises them."""
    digest = hashlib.sha256()
    head = {
        "rule": snakemake.rule,
        "wildcards": dict(snakemake.wildcards.items()),
        "params": dict(snakemake.params.items()) if params is None else params,
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for path in sorted({str(p) for p in snakemake.input}):
        if os.path.isfile(path):
            digest.update(path.encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def code_digest(snakemake) -> str:
    """sha256 of the library code the job runs (its `code` inputs), recorded in what it makes:
    a result kept across reruns must also be one today's code would make."""
    digest = hashlib.sha256()
    for path in sorted(Path(p).resolve() for p in snakemake.input.code):
        name = path.relative_to(ROOT).as_posix()  # whatever the working directory
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def resume_or_restart(folder, fingerprint: str) -> bool:
    """Keep `folder`'s work only if the same job made it; True when keeping it.

    A rerun with the same fingerprint continues (checkpoints, finished images); anything else
    finds an emptied folder and starts over.
    """
    folder = Path(folder)
    marker = folder / FINGERPRINT
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        logging.info("continuing the work already in %s (same inputs and settings)", folder)
        return True
    if folder.exists() and any(folder.iterdir()):
        logging.info("clearing %s: it holds the work of another version of this job", folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marker.write_text(fingerprint + "\n")
    return False
