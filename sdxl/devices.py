"""Which GPUs a job may use: one lock file per device, claimed before torch sees CUDA.

Snakemake only counts `gpu` tokens (`--resources gpu=N`); it never says *which* device a job
got. So a GPU job claims free devices itself: it takes a non-blocking `fcntl.flock` on
`<lock dir>/gpu-<device>.lock` for each device it needs, then sets `CUDA_VISIBLE_DEVICES` to
those devices. The kernel drops the locks when the process exits, however it exits (even
SIGKILL or the OOM killer), so a lock can never go stale.

Where the device list comes from, first match wins:
- `SDXL_GPUS` (comma-separated device ids): an explicit list, e.g. "0,1", or fakes in tests;
- `CUDA_VISIBLE_DEVICES` when a scheduler (SLURM, PBS, LSF) set it: used as given, no locks,
  since the scheduler already gave this job its own devices;
- `CUDA_VISIBLE_DEVICES` set by hand: the devices to share out between jobs;
- `nvidia-smi -L`: every GPU of the machine;
- none of these: no GPU, the job runs on the CPU.

`SDXL_FAKE_GPUS=1` makes the devices names only (test clusters whose GPUs are /dev/null): they
are claimed exactly as real ones, but the job computes on the CPU.

This module never imports torch: call `claim_devices` before anything imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# A scheduler's job id variable -> the scheduler's name.
SCHEDULER_JOB_VARS = {"SLURM_JOB_ID": "SLURM", "PBS_JOBID": "PBS", "LSB_JOBID": "LSF"}
_held: list = []  # open lock files; closing one (or exiting) releases its lock


@dataclass(frozen=True)
class Claim:
    """The devices a job got; `devices` is empty for a CPU job."""

    devices: tuple[str, ...]
    source: str  # where the devices came from: SDXL_GPUS, scheduler, CUDA_VISIBLE_DEVICES, ...
    fake: bool = False  # SDXL_FAKE_GPUS: the devices exist only as names, compute on the CPU

    @property
    def torch_device(self) -> str:
        """'cuda' (the claimed devices are then cuda:0..n-1) or 'cpu'."""
        return "cuda" if self.devices and not self.fake else "cpu"


def lock_dir() -> Path:
    """Node-local folder for the locks (flock on NFS is unreliable): $SDXL_GPU_LOCK_DIR wins."""
    if os.environ.get("SDXL_GPU_LOCK_DIR"):
        return Path(os.environ["SDXL_GPU_LOCK_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "sdxl-gpu-locks"
    return Path(tempfile.gettempdir()) / f"sdxl-gpu-locks-{os.getuid()}"


def _fake() -> bool:
    """SDXL_FAKE_GPUS is set: the devices are only names (see the module docstring)."""
    return os.environ.get("SDXL_FAKE_GPUS", "") not in ("", "0")


def _scheduler_job() -> str:
    """'SLURM job 42' (or PBS, LSF) when a scheduler started this process, else ''."""
    for var, scheduler in SCHEDULER_JOB_VARS.items():
        if os.environ.get(var):
            return f"{scheduler} job {os.environ[var]}"
    return ""


def _split(value: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in value.split(",") if d.strip())


def _nvidia_smi_devices() -> tuple[str, ...]:
    """GPU indices listed by `nvidia-smi -L` (PCI bus order); none if it is missing or fails."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    lines = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return tuple(line.split(":")[0].split()[1] for line in lines)


def candidate_devices() -> tuple[tuple[str, ...], str]:
    """(device ids this job may take, where they came from); see the module docstring."""
    if os.environ.get("SDXL_GPUS") is not None:
        return _split(os.environ["SDXL_GPUS"]), "SDXL_GPUS"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return _split(visible), "scheduler" if _scheduler_job() else "CUDA_VISIBLE_DEVICES"
    return _nvidia_smi_devices(), "nvidia-smi"


def _try_lock(folder: Path, device: str):
    """The open, exclusively locked lock file of `device`, or None if another job holds it."""
    path = folder / f"gpu-{device.replace('/', '_')}.lock"
    handle = open(path, "a+")  # noqa: SIM115 -- kept open: the lock lives as long as the file
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def _lock_some(folder: Path, devices: tuple[str, ...], count: int) -> list:
    """Lock `count` of `devices` (starting at a random one to spread jobs), or none at all."""
    start = random.randrange(len(devices))
    got = []
    for device in devices[start:] + devices[:start]:
        handle = _try_lock(folder, device)
        if handle is not None:
            got.append((device, handle))
            if len(got) == count:
                return got
    for _, handle in got:  # not enough: release, so two jobs never wait on each other's half
        handle.close()
    return []


def _check_torch_not_started() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            "claim_devices() must run before CUDA is initialised (CUDA_VISIBLE_DEVICES is read "
            "once); call it at the top of the job, before anything uses torch.cuda"
        )


def claim_devices(count: int, *, timeout: float | None = None, poll: float = 1.0) -> Claim:
    """Claim `count` free GPUs for this process and export CUDA_VISIBLE_DEVICES.

    Returns a CPU claim when `count` is 0 or the machine has no GPU. Waits (polling) while all
    devices are busy; `timeout` seconds (None: forever) then raises TimeoutError.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    devices, source = candidate_devices()
    if job := _scheduler_job():
        log.info("running as %s", job)  # the job's log then names the scheduler job it ran in
    if count == 0 or not devices:
        return Claim((), source if devices else "no GPU")
    if count > len(devices):
        raise RuntimeError(
            f"the job asks for {count} GPU(s) but only {len(devices)} exist ({source}: "
            f"{','.join(devices)}); lower the rule's gpu resource"
        )
    if source == "scheduler":
        # SLURM_STEP_GPUS: SLURM's own index of the devices (equal to CUDA_VISIBLE_DEVICES
        # unless cgroups renumber them); logged so a job's log shows whose devices it used.
        log.info("using the scheduler's devices: CUDA_VISIBLE_DEVICES=%s SLURM_STEP_GPUS=%s",
                 ",".join(devices), os.environ.get("SLURM_STEP_GPUS", "-"))  # fmt: skip
        return Claim(devices[:count], source, _fake())
    _check_torch_not_started()
    return _wait_for_locks(devices, source, count, timeout, poll)


def _wait_for_locks(devices, source: str, count: int, timeout, poll: float) -> Claim:
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    started = last_note = time.monotonic()
    while not (got := _lock_some(folder, devices, count)):
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise TimeoutError(
                f"no {count} free GPU(s) among {','.join(devices)} after {timeout:.0f}s "
                f"(locks in {folder}); run with --resources gpu=N to match the machine"
            )
        if now - last_note > 60:
            log.info("waiting for %d free GPU(s) among %s", count, ",".join(devices))
            last_note = now
        time.sleep(poll * (0.5 + random.random()))
    _held.extend(handle for _, handle in got)
    claimed = tuple(device for device, _ in got)
    if source == "nvidia-smi":
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's numbering
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    log.info("claimed GPU(s) %s (%s; locks in %s)", ",".join(claimed), source, folder)
    return Claim(claimed, source, _fake())


def release_devices() -> None:
    """Release every lock this process holds (normally the process exit does it)."""
    while _held:
        with contextlib.suppress(OSError):
            _held.pop().close()
