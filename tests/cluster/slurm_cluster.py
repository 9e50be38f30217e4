"""A real single-node SLURM for the tests: started by start_slurm.sh, stopped by PID.

    with cluster_or_skip() as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env())

SLURM commands find the cluster through `cluster.env()` (SLURM_CONF); commands inside jobs,
which the Snakemake plugin runs without SLURM_* variables, find it at /run/slurm/conf.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
START, STOP = HERE / "start_slurm.sh", HERE / "stop_slurm.sh"
OVERLAY = HERE / "overlay"
MACHINE_LOCK = Path(tempfile.gettempdir()) / "sdxl-test-slurm.lock"
CANNOT_RUN_HERE = 2  # start_slurm.sh's exit code when it is not root or cannot install SLURM
# Memory is not a consumable on the test cluster (CR_Core, no cgroups): RealMemory is only the
# largest --mem a job may ask for, so it is set high enough for a real profile's GPU rules.
MEM_MB = 131072


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root, SLURM not installable)."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its state folder and the slurm.conf its clients need."""

    state: Path

    @property
    def conf(self) -> Path:
        return self.state / "slurm.conf"

    def env(self, base: dict | None = None) -> dict[str, str]:
        """`base` (default os.environ) with SLURM commands pointed at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 60) -> str:
        """Run a SLURM command against this cluster and return its stdout."""
        result = subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
        return result.stdout

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        return "\n".join(
            f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            for log in sorted((self.state / "log").glob("*.log"))
        )


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(state: Path, cpus: int | None = None, mem_mb: int = MEM_MB) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with two fake GPUs; raise ClusterUnavailable here."""
    if shutil.which("bash") is None:
        raise ClusterUnavailable("bash is needed to start the test cluster")
    env = {
        **os.environ,
        "SLURM_TEST_CPUS": str(cpus or max(4, os.cpu_count() or 1)),
        "SLURM_TEST_MEM_MB": str(mem_mb),
        "SLURM_TEST_CTLD_PORT": str(_free_port()),
        "SLURM_TEST_SLURMD_PORT": str(_free_port()),
    }
    result = subprocess.run(
        ["bash", str(START), str(state)], env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode == CANNOT_RUN_HERE:
        raise ClusterUnavailable(result.stderr.strip())
    cluster = SlurmCluster(state)
    if result.returncode != 0:
        raise RuntimeError(f"start_slurm.sh failed:\n{result.stderr}\n{cluster.logs()}")
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the jobs, end the daemons by PID and remove the state folder."""
    subprocess.run(["bash", str(STOP), str(cluster.state)], check=True, timeout=120)


@contextmanager
def cluster_or_skip(cpus: int | None = None, mem_mb: int = MEM_MB) -> Iterator[SlurmCluster]:
    """A running cluster for the `with` block; skips the test where this machine cannot run one.

    One test cluster runs per machine (fixed ports and paths): the block holds MACHINE_LOCK, so a
    second test process (the other pytest-xdist worker) waits for the first one's block to end.
    """
    with open(MACHINE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # A short path: munge's socket path must stay under the 108-byte limit.
        state = Path(tempfile.mkdtemp(prefix="sdxl-slurm-"))
        try:
            cluster = start_cluster(state, cpus, mem_mb)
        except ClusterUnavailable as err:
            shutil.rmtree(state, ignore_errors=True)
            pytest.skip(f"no test SLURM cluster: {err}")
        try:
            yield cluster
        finally:
            stop_cluster(cluster)


# What the executor plugin prints for each job it submits.
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@dataclass(frozen=True)
class Run:
    """One snakemake invocation: exit code, output, and the SLURM jobs it submitted."""

    returncode: int
    output: str
    seconds: float

    @property
    def submitted(self) -> dict[str, str]:
        """SLURM job id -> the job's SLURM log, as the plugin reported them."""
        return dict(SUBMITTED.findall(self.output))

    def rules(self) -> dict[str, str]:
        """SLURM job id -> rule (the plugin files each SLURM log under rule_<name>/)."""
        return {
            job: re.search(r"/rule_(\w+)/", log).group(1) for job, log in self.submitted.items()
        }
