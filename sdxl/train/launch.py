"""Run training in this process, or under torchrun with one process per GPU (DDP).

`python -m sdxl.train.launch config.json` is the entry point torchrun starts: it reads a
TrainConfig saved as JSON (TrainConfig.to_dict) and trains.

One writer per output folder: the process that trains (rank 0) holds `folder_lock` on
output_dir for the whole run. When run_training starts torchrun, it holds the lock itself
while torchrun runs and tells the ranks so (LOCK_HELD_ENV), and torchrun dies with it
(PR_SET_PDEATHSIG); each rank dies with torchrun (distributed.setup), so killing the parent
kills the whole tree and a rerun never runs beside a survivor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sdxl.procs import die_with_parent, folder_lock
from sdxl.train.config import TrainConfig
from sdxl.utils import atomic_write_text, remove_stale_temps

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
LOCK_HELD_ENV = "SDXL_TRAIN_LOCK_HELD"  # the output folder whose lock a parent process holds
LOCK_WHAT = "training outputs"


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike, dist) -> Iterator[None]:
    """Rank 0 holds output_dir's lock for the block (unless the launching parent holds it).

    Under the lock, temp files left by a killed run (output_dir, cache/, checkpoints/) are
    removed: no live writer can own them.
    """
    folder = Path(output_dir)
    if not dist.is_main:
        yield
        return
    held_by_parent = os.environ.get(LOCK_HELD_ENV) == str(folder.resolve())
    with contextlib.nullcontext() if held_by_parent else folder_lock(folder, LOCK_WHAT):
        removed = remove_stale_temps(folder, recursive=True)
        if removed:
            log.info("removed %d temp file(s) left by a killed run: %s", len(removed),
                     ", ".join(str(p.relative_to(folder)) for p in removed[:5]))  # fmt: skip
        yield


def torchrun_command(config_json: str | os.PathLike, num_gpus: int) -> list[str]:
    """The torchrun command line that trains `config_json` on `num_gpus` local GPUs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={num_gpus}", "-m", "sdxl.train.launch", str(config_json)]  # fmt: skip


def run_training(cfg: TrainConfig, num_gpus: int = 1) -> Path:
    """Train `cfg`: in this process for 0 or 1 GPU, else DDP over `num_gpus` via torchrun."""
    if num_gpus <= 1:
        from sdxl.train.loop import train

        return train(cfg)
    out = Path(cfg.output_dir)
    with folder_lock(out, LOCK_WHAT):
        config_json = out / "launch-config.json"
        atomic_write_text(config_json, json.dumps(cfg.to_dict(), indent=2))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            LOCK_HELD_ENV: str(out.resolve()),
        }
        command = torchrun_command(config_json, num_gpus)
        log.info("starting DDP training on %d GPUs: %s", num_gpus, " ".join(command))
        parent = os.getpid()
        subprocess.run(command, check=True, env=env, preexec_fn=lambda: die_with_parent(parent))
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sdxl.train.launch CONFIG.json", file=sys.stderr)
        return 2
    from sdxl.train.loop import train

    # Which rank runs where: a job's log then shows torchrun's processes on its devices.
    log.info("rank %s of %s, CUDA_VISIBLE_DEVICES=%s", os.environ.get("RANK", "0"),
             os.environ.get("WORLD_SIZE", "1"), os.environ.get("CUDA_VISIBLE_DEVICES", "-"))  # fmt: skip
    train(TrainConfig.from_dict(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
