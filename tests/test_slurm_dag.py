"""The demo DAG on a real single-node SLURM (tests/cluster), through the SLURM profile.

One module-wide sequence of runs in a copy of the workflow, with the real profile
(`--profile profiles/slurm`) and the test cluster's overlay as the workflow profile:
1. a bad image under data.policy `fail`: validation fails as a SLURM job, snakemake says so;
2. the image removed: the whole DAG runs, every non-local job as an sbatch job, train_lora on
   two GPUs (DDP through torchrun, gloo on the CPU);
3. once more: nothing is submitted.
Meanwhile the same config runs locally (two fake GPUs through the lock-file allocator); the
outputs must be equal. The cluster's GPUs are /dev/null and /dev/zero: SDXL_FAKE_GPUS=1 makes
jobs claim them as real ones and compute on the CPU.

Skipped only where the cluster cannot run: not root, or SLURM not installable.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.cluster.slurm_cluster import OVERLAY, Run, SlurmCluster
from tests.test_workflow import BIN, DEMO_CONFIG, copy_workflow

# The tests of the test SLURM cluster (one per machine) run on one xdist worker.
pytestmark = pytest.mark.xdist_group("slurm")

# A device the submitting shell pretends to have: SLURM jobs must see SLURM's, never this one.
CANARY_DEVICE = "7"
TEST_CONFIG = "test-config.yaml"
# The demo, a little smaller (one latent shard, so both cache jobs hold a GPU at once), with
# the `fail` policy so that a bad image stops the workflow.
SETTINGS = {
    "data": {"policy": "fail"},
    "cache": {"latents": {"shards": 1}},
    "generate": {"num_images": 4, "images_per_shard": 2},
    # train_lora asks for two GPUs and runs torchrun; no validation prompts: a quick grid job.
    "train": {"gpus": 2, "max_steps": 2, "validation_prompts": []},
    # The evaluation jobs are checked by the demo run (tests/test_workflow.py).
    "evaluate": {"enabled": False},
}
BAD_IMAGE = "examples/shapes/99_broken.png"
SLURM_RULES = ["validate_captions", "cache_latents", "cache_text", "train_lora", "validate_lora",
               "generate", "generate", "assemble"]  # fmt: skip
GPU_RULES = {"cache_latents", "cache_text", "train_lora", "validate_lora", "generate"}
LOCAL_RULE_LOGS = ["weights", "record_config", "merge_latents", "report"]


def _env(**extra: str) -> dict[str, str]:
    """One thread per job, CPU compute on fake GPUs, bytecode caching on (each SLURM job starts
    Python three times), no CUDA mask and no device list unless given."""
    drop = {"CUDA_VISIBLE_DEVICES", "SDXL_GPUS", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "SDXL_FAKE_GPUS": "1", **extra}


def prepare(workdir: Path) -> Path:
    """A copy of the workflow with the test's settings beside it."""
    copy_workflow(workdir)
    (workdir / TEST_CONFIG).write_text(yaml.safe_dump(SETTINGS))
    return workdir


def run_slurm(cluster: SlurmCluster, workdir: Path, overlay: Path, name: str) -> Run:
    """The workflow through the SLURM profile and the test overlay; output also in name.txt."""
    cmd = [str(BIN / "snakemake"), "--profile", "profiles/slurm", "--workflow-profile",
           str(overlay), "--configfile", DEMO_CONFIG, TEST_CONFIG, "--nocolor"]  # fmt: skip
    env = cluster.env(_env(CUDA_VISIBLE_DEVICES=CANARY_DEVICE))
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    (workdir.parent / f"{name}.txt").write_text(result.stdout + result.stderr)
    return Run(result.returncode, result.stdout + result.stderr, time.monotonic() - start)


def start_local(workdir: Path) -> subprocess.Popen:
    """The same config locally: two fake GPUs shared out by the lock-file allocator."""
    cmd = [str(BIN / "snakemake"), "--configfile", DEMO_CONFIG, TEST_CONFIG, "--cores", "2",
           "--resources", "gpu=2", "--set-threads",
           "cache_latents=1", "cache_text=1", "train_lora=1", "validate_lora=1", "generate=1",
           "--nocolor"]  # fmt: skip
    env = _env(SDXL_GPUS="0,1", SDXL_GPU_LOCK_DIR=str(workdir.parent / "locks"))
    with (workdir.parent / "local.txt").open("w") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


@dataclass(frozen=True)
class SlurmJob:
    """What squeue remembers of a finished job (MinJobAge keeps it listed)."""

    state: str
    start: datetime
    end: datetime
    gpus: int  # as requested: sbatch --gpus=N shows as gres:gpu:N


def slurm_jobs(cluster: SlurmCluster) -> dict[str, SlurmJob]:
    out = cluster.run("squeue", "-h", "-t", "all", "-O", "JobID:|,State:|,StartTime:|,EndTime:|,tres-per-job")  # fmt: skip
    jobs = {}
    for line in out.splitlines():
        job, state, start, end, tres = (f.strip() for f in line.split("|"))
        gpus = re.search(r"gpu:(\d+)", tres)
        jobs[job] = SlurmJob(state, datetime.fromisoformat(start), datetime.fromisoformat(end),
                             int(gpus.group(1)) if gpus else 0)  # fmt: skip
    return jobs


@dataclass(frozen=True)
class Runs:
    work: Path
    local: Path
    failed: Run
    failed_rule_log: str
    fixed: Run
    again: Run
    jobs: dict[str, SlurmJob]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("slurm-dag")
    local = prepare(root / "local" / "run")
    local_run = start_local(local)  # runs while the cluster does: most of a SLURM run is waiting
    work = prepare(root / "slurm")
    overlay = OVERLAY
    try:
        (work / BAD_IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        (work / BAD_IMAGE).with_suffix(".txt").write_text("a broken file\n")
        failed = run_slurm(cluster, work, overlay, "failed")
        failed_rule_log = (work / "results/logs/validate_captions.log").read_text()
        (work / BAD_IMAGE).unlink()
        (work / BAD_IMAGE).with_suffix(".txt").unlink()
        fixed = run_slurm(cluster, work, overlay, "fixed")
        again = run_slurm(cluster, work, overlay, "again")
        assert local_run.wait(timeout=900) == 0, (root / "local/local.txt").read_text()[-6000:]
    finally:
        if local_run.poll() is None:
            local_run.kill()
    print(f"snakemake on SLURM: {failed.seconds:.0f} s (failing), {fixed.seconds:.0f} s, "
          f"{again.seconds:.0f} s")  # fmt: skip
    return Runs(work, local, failed, failed_rule_log, fixed, again, slurm_jobs(cluster))


@dataclass(frozen=True)
class JobLog:
    """What a rule's log says about where it ran (lines of sdxl.devices and the scripts)."""

    slurm_job: str | None
    devices: tuple[str, ...]
    source: str
    visible: str | None  # CUDA_VISIBLE_DEVICES and SLURM_STEP_GPUS as the job saw them
    step_gpus: str | None


def job_log(path: Path) -> JobLog:
    text = path.read_text()
    job = re.search(r"running as SLURM job (\d+)", text)
    claim = re.search(r"rule \w+ on (\S+) \(([^)]*)\)", text)
    given = re.search(r"scheduler's devices: CUDA_VISIBLE_DEVICES=(\S+) SLURM_STEP_GPUS=(\S+)", text)  # fmt: skip
    assert claim, f"{path} does not say where it ran:\n{text[-2000:]}"
    devices = () if claim.group(1) == "cpu" else tuple(claim.group(1).split(","))
    return JobLog(job.group(1) if job else None, devices, claim.group(2),
                  given.group(1) if given else None, given.group(2) if given else None)  # fmt: skip


def rule_logs(work: Path, rule: str) -> list[Path]:
    logs = work / "results/logs"
    return sorted((logs / rule).glob("*.log")) if (logs / rule).is_dir() else [logs / f"{rule}.log"]


def test_failing_job_is_reported_with_its_logs(runs):
    failed = runs.failed
    assert failed.returncode != 0
    assert list(failed.rules().values()) == ["validate_captions"], failed.output
    error = failed.output.split("Error in rule validate_captions", 1)
    assert len(error) == 2, failed.output
    assert "results/logs/validate_captions.log" in error[1]  # the rule's log
    (slurm_log,) = failed.submitted.values()
    assert slurm_log in error[1]  # and the SLURM job's log
    assert "99_broken.png" in runs.failed_rule_log and "policy 'fail'" in runs.failed_rule_log
    (job,) = failed.submitted
    assert runs.jobs[job].state == "FAILED"


def test_rerun_after_the_fix_completes(runs):
    fixed = runs.fixed
    assert fixed.returncode == 0, fixed.output[-6000:]
    assert (runs.work / "results/dataset/captions.json").is_file()
    assert (runs.work / "results/report/loss_curve.svg").is_file()


def test_every_job_went_through_sbatch(runs):
    """Each non-local job ran inside the SLURM job the plugin submitted for it; local ones not."""
    fixed = runs.fixed
    assert sorted(fixed.rules().values()) == sorted(SLURM_RULES), fixed.output[-6000:]
    for job, rule in fixed.rules().items():
        assert runs.jobs[job].state == "COMPLETED", (job, rule)
    ran_in = {
        job_log(path).slurm_job: rule for rule in set(SLURM_RULES) for path in rule_logs(runs.work, rule)
    }  # fmt: skip
    assert ran_in == fixed.rules()
    for rule in LOCAL_RULE_LOGS:
        assert job_log(runs.work / f"results/logs/{rule}.log").slurm_job is None, rule


def test_gpu_jobs_used_the_distinct_devices_slurm_gave_them(runs):
    fixed = runs.fixed
    gpu_jobs = {job: rule for job, rule in fixed.rules().items() if rule in GPU_RULES}
    logs = {log.slurm_job: log for r in GPU_RULES for log in map(job_log, rule_logs(runs.work, r))}
    for job, rule in gpu_jobs.items():
        log, slurm = logs[job], runs.jobs[job]
        assert log.source == "scheduler" and CANARY_DEVICE not in log.devices, (rule, log)
        # The devices SLURM allocated (SLURM_STEP_GPUS; same numbering without cgroups), as many
        # as the rule asked for: one, two for train_lora.
        assert log.devices == tuple(log.visible.split(",")) == tuple(log.step_gpus.split(","))
        assert len(log.devices) == slurm.gpus == (2 if rule == "train_lora" else 1), (rule, log)
    overlapping = [
        (a, b)
        for a in gpu_jobs
        for b in gpu_jobs
        if a < b and runs.jobs[a].start < runs.jobs[b].end and runs.jobs[b].start < runs.jobs[a].end
    ]
    assert overlapping, "no two GPU jobs ran at the same time"
    for a, b in overlapping:
        assert not set(logs[a].devices) & set(logs[b].devices), (gpu_jobs[a], gpu_jobs[b])


def test_train_lora_ran_torchrun_on_its_two_devices(runs):
    """On SLURM with the devices it was given; locally with the two the allocator claimed."""
    for work, claimed in ((runs.work, "scheduler"), (runs.local, "SDXL_GPUS")):
        text = (work / "results/logs/train_lora/demo.log").read_text()
        log = job_log(work / "results/logs/train_lora/demo.log")
        assert log.source == claimed and sorted(log.devices) == ["0", "1"], log
        assert "starting DDP training on 2 GPUs" in text
        visible = ",".join(log.devices)
        for rank in (0, 1):
            assert f"rank {rank} of 2, CUDA_VISIBLE_DEVICES={visible}" in text, text[-3000:]


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [
            {k: float(r[k]) for k in ("step", "loss", "lr", "grad_norm")} for r in csv.DictReader(f)
        ]


def _lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_outputs_equal_the_local_run(runs):
    for rel in ("results/train/demo/lora_final.safetensors",):
        want, got = _lora(runs.local / rel), _lora(runs.work / rel)
        assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    assert _metrics(runs.local / "results/train/demo") == _metrics(runs.work / "results/train/demo")
    from PIL import Image

    names = sorted(p.name for p in (runs.local / "results/dataset").glob("*.png"))
    assert len(names) == 5  # four images and the contact sheet
    assert names == sorted(p.name for p in (runs.work / "results/dataset").glob("*.png"))
    for name in names:
        a, b = (
            np.asarray(Image.open(w / "results/dataset" / name)) for w in (runs.local, runs.work)
        )
        assert np.array_equal(a, b), name


def test_two_gpu_lora_equals_one_process_with_the_same_global_batch(runs, tmp_path):
    from sdxl.train.config import TrainConfig
    from sdxl.train.launch import run_training

    run = runs.work / "results/train/demo"
    settings = json.loads((run / "config.json").read_text())
    settings.update(data_dir=str(runs.work / "results/cache"), output_dir=str(tmp_path / "one"),
                    pretrained_model=str(runs.work / "results/weights/model"),
                    validation_interval=0,
                    batch_size=2 * settings["batch_size"])  # per GPU: one process, same global batch  # fmt: skip
    run_training(TrainConfig.from_dict(settings), num_gpus=1)
    want, got = (
        _lora(tmp_path / "one/lora_final.safetensors"),
        _lora(run / "lora_final.safetensors"),
    )
    assert want.keys() == got.keys()
    # Equal up to the order of float sums, which Adam amplifies where a gradient is nearly 0
    # (single elements then differ by up to ~lr): compare the norm of all LoRA weights together.
    diff = sum(((got[k] - want[k]) ** 2).sum() for k in want).sqrt()
    assert diff / sum((want[k] ** 2).sum() for k in want).sqrt() < 1e-3
    one, two = _metrics(tmp_path / "one"), _metrics(run)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]  # max_steps 2
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a, b)


def test_second_run_submits_nothing(runs):
    again = runs.again
    assert again.returncode == 0, again.output[-6000:]
    assert again.submitted == {}
    assert "Nothing to be done" in again.output


def test_fake_gpus_are_claimed_as_given_and_compute_on_the_cpu(monkeypatch):
    """What every job of the runs above does (no cluster needed): SLURM's devices, CPU torch."""
    from sdxl import devices

    monkeypatch.delenv("SDXL_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SDXL_FAKE_GPUS", "1")
    claim = devices.claim_devices(1)
    assert claim.devices == ("1",) and claim.source == "scheduler"
    assert claim.fake and claim.torch_device == "cpu"
    monkeypatch.setenv("SDXL_FAKE_GPUS", "0")
    assert devices.claim_devices(1).torch_device == "cuda"
