"""A real single-node SLURM with two fake GPUs, and Snakemake's SLURM executor plugin on it.

The cluster (tests/cluster/start_slurm.sh) hands out GPUs exactly as a GPU cluster does; the
trivial workflow (tests/cluster/trivial) then runs through `--executor slurm` with the test
cluster's profile overlay. Skipped only where the cluster cannot run: not root, or SLURM not
installable (CI is root and installs `slurm-wlm munge`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import OVERLAY, Run, SlurmCluster

# The tests of the test SLURM cluster (one per machine) run on one xdist worker.
pytestmark = pytest.mark.xdist_group("slurm")

TRIVIAL = Path(__file__).resolve().parent / "cluster" / "trivial"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# A device index the submitting shell pretends to have: jobs must see SLURM's, never this one.
CANARY_DEVICE = "7"


def snakemake(cluster: SlurmCluster, workdir: Path, *targets: str) -> Run:
    """Run the trivial workflow in `workdir` through the SLURM executor."""
    env = cluster.env({**os.environ, "CUDA_VISIBLE_DEVICES": CANARY_DEVICE})
    cmd = [str(SNAKEMAKE), *targets, "--snakefile", str(TRIVIAL / "Snakefile")]
    cmd += ["--directory", str(workdir), "--workflow-profile", str(OVERLAY)]
    cmd += ["--executor", "slurm", "--jobs", "4", "--keep-going", "--nocolor"]
    start = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return Run(result.returncode, result.stdout + result.stderr, time.monotonic() - start)


def fields(path: Path) -> dict[str, str]:
    """'cuda=0 job=12' -> {'cuda': '0', 'job': '12'}."""
    return dict(item.split("=", 1) for item in path.read_text().split())


@dataclass(frozen=True)
class Runs:
    """The trivial workflow with a failing job, then after fixing it, then once more."""

    workdir: Path
    first: Run
    failed_rule_log: str
    fixed: Run
    again: Run


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Runs:
    workdir = tmp_path_factory.mktemp("trivial")
    (workdir / "check.txt").write_text("bad\n")
    first = snakemake(cluster, workdir, "all", "checked.txt")
    failed_rule_log = (workdir / "logs" / "checked.log").read_text()
    (workdir / "check.txt").write_text("good\n")
    fixed = snakemake(cluster, workdir, "all", "checked.txt")
    again = snakemake(cluster, workdir, "all", "checked.txt")
    print(f"snakemake runs: {first.seconds:.0f} s, {fixed.seconds:.0f} s, {again.seconds:.0f} s")
    return Runs(workdir, first, failed_rule_log, fixed, again)


def test_node_is_idle_with_two_gpus(cluster):
    assert cluster.run("sinfo", "-h", "-N", "-p", "gpu", "-o", "%T %G").split() == [
        "idle",
        "gpu:2",
    ]


def test_srun_hands_out_a_gpu(cluster):
    out = cluster.run("srun", "--gres=gpu:1", "printenv", "CUDA_VISIBLE_DEVICES")
    assert out.strip() in {"0", "1"}


def test_concurrent_jobs_get_distinct_gpus(cluster, tmp_path):
    """Two jobs that each wait for the other hold both GPUs at once: SLURM splits them."""
    job_ids = [
        cluster.run(
            "sbatch", "--parsable", "--gres=gpu:1", "-D", str(tmp_path), "-o", f"job{i}.log",
            "--wrap", f"bash {TRIVIAL / 'record_gpu.sh'} gpu{i}.txt",
        ).strip()
        for i in range(2)
    ]  # fmt: skip
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"gpu{i}.txt").exists() for i in range(2)):
        assert time.monotonic() < deadline, cluster.run("squeue", "--states=all")
        time.sleep(0.5)
    records = [fields(tmp_path / f"gpu{i}.txt") for i in range(2)]
    assert [r["job"] for r in records] == job_ids
    assert {r["started"] for r in records} == {"2"}, "the two jobs did not overlap"
    assert sorted(r["cuda"] for r in records) == ["0", "1"]
    assert all(r["cuda"] == r["slurm_idx"] for r in records)


def test_every_job_went_through_sbatch(cluster, runs):
    """Each job ran inside the SLURM job the plugin submitted for it, and SLURM saw it end."""
    workdir, first = runs.workdir, runs.first
    assert len(first.submitted) == 4, first.output  # cpu, 2 GPU jobs, checked
    job_ids = [
        fields(workdir / name)["job"] for name in ["cpu.txt", "gpu/gpus.txt", "gpu/gres.txt"]
    ]
    assert sorted(job_ids) == sorted(
        i for i, log in first.submitted.items() if "checked" not in log
    )
    states = dict(
        line.split()
        for line in cluster.run("squeue", "-h", "-t", "all", "-o", "%i %T").splitlines()
    )
    assert {states[i] for i in job_ids} == {"COMPLETED"}
    (failed_id,) = set(first.submitted) - set(job_ids)
    assert states[failed_id] == "FAILED"


def test_gpu_jobs_got_distinct_devices_from_slurm(runs):
    """`gpu=1` (--gpus) and `gres="gpu:1"` (--gres) both reach the job step as SLURM's device."""
    workdir = runs.workdir
    records = [fields(workdir / "gpu" / name) for name in ["gpus.txt", "gres.txt"]]
    assert {r["started"] for r in records} == {"2"}, "the two GPU jobs did not overlap"
    assert sorted(r["cuda"] for r in records) == ["0", "1"]
    assert all(r["cuda"] == r["slurm_idx"] for r in records), "not the device SLURM allocated"


def test_cpu_job_sees_no_gpu(runs):
    """SLURM drops the submitting shell's CUDA_VISIBLE_DEVICES from a job without GPUs."""
    assert fields(runs.workdir / "cpu.txt")["cuda"] == "none"


def test_failing_job_is_reported_with_its_slurm_log(runs):
    first = runs.first
    assert first.returncode != 0
    assert "Error in rule checked" in first.output
    (failed_log,) = [log for log in first.submitted.values() if "rule_checked" in log]
    assert failed_log in first.output.split("Error in rule checked", 1)[1]
    assert "Error in rule checked" in Path(failed_log).read_text()
    assert "check.txt is not good" in runs.failed_rule_log


def test_rerun_after_the_fix_submits_only_the_fixed_job(runs):
    fixed = runs.fixed
    assert fixed.returncode == 0, fixed.output
    assert [Path(log).parent.name for log in fixed.submitted.values()] == ["rule_checked"]
    assert (runs.workdir / "checked.txt").read_text() == "good\n"


def test_second_run_submits_nothing(runs):
    again = runs.again
    assert again.returncode == 0, again.output
    assert again.submitted == {}
    assert "Nothing to be done" in again.output
