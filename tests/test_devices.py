"""The lock-file GPU allocator: concurrent jobs never share a device, kills release locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdxl import devices

ROOT = Path(__file__).resolve().parents[1]

# One job: claim `count` devices, hold them for `hold` seconds, record what it held and when.
JOB = """
import json, sys, time
from sdxl.devices import claim_devices
count, hold, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
claim = claim_devices(count, poll=0.02)
start = time.time()
time.sleep(hold)
with open(out, "w") as f:
    json.dump({"devices": list(claim.devices), "start": start, "end": time.time(),
               "torch_loaded": "torch" in sys.modules}, f)
"""


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(SDXL_GPUS="0,1", SDXL_GPU_LOCK_DIR=str(tmp_path / "locks"), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _spawn(tmp_path: Path, name: str, count: int, hold: float, env: dict) -> subprocess.Popen:
    out = tmp_path / f"{name}.json"
    return subprocess.Popen([sys.executable, "-c", JOB, str(count), str(hold), str(out)], env=env)


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_concurrent_jobs_never_share_a_device(tmp_path):
    env = _env(tmp_path)
    counts = [1] * 8 + [2, 2]  # two jobs need both devices at once
    procs = [_spawn(tmp_path, f"job{i}", c, 0.3, env) for i, c in enumerate(counts)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    records = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(len(counts))]
    for record, count in zip(records, counts, strict=True):
        assert len(record["devices"]) == count and set(record["devices"]) <= {"0", "1"}
        assert not record["torch_loaded"]
    clashes = [
        (i, j)
        for i, a in enumerate(records)
        for j, b in enumerate(records[i + 1 :], start=i + 1)
        if set(a["devices"]) & set(b["devices"]) and _overlaps(a, b)
    ]
    assert clashes == []
    # both devices were really used in parallel at some point (the allocator does not serialise)
    singles = [r for r, c in zip(records, counts, strict=True) if c == 1]
    assert any(_overlaps(a, b) for a in singles for b in singles if a is not b)


def test_killed_job_releases_its_device(tmp_path):
    env = _env(tmp_path, SDXL_GPUS="0")
    holder = _spawn(tmp_path, "holder", 1, 60.0, env)
    deadline = time.time() + 30
    lock = tmp_path / "locks" / "gpu-0.lock"
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.time() < deadline:
        time.sleep(0.05)
    waiter = _spawn(tmp_path, "waiter", 1, 0.0, env)
    time.sleep(0.5)
    assert waiter.poll() is None  # blocked: the device is held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert waiter.wait(timeout=30) == 0
    assert json.loads((tmp_path / "waiter.json").read_text())["devices"] == ["0"]


def test_scheduler_devices_are_used_as_given(tmp_path, monkeypatch):
    monkeypatch.delenv("SDXL_GPUS", raising=False)
    monkeypatch.setenv("SDXL_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    claim = devices.claim_devices(1, timeout=1)
    assert claim.devices == ("0",) and claim.source == "scheduler"
    assert claim.torch_device == "cuda"
    assert not (tmp_path / "locks").exists()  # two SLURM jobs may both see "device 0"


def test_hand_set_visible_devices_are_shared_out(tmp_path, monkeypatch):
    monkeypatch.delenv("SDXL_GPUS", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SDXL_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    try:
        first = devices.claim_devices(1, timeout=1)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == first.devices[0]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # as another job would see it
        second = devices.claim_devices(1, timeout=1)  # flock is per open file: the other one
        assert {first.devices[0], second.devices[0]} == {"2", "3"}
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
        with pytest.raises(TimeoutError, match="no 1 free GPU"):
            devices.claim_devices(1, timeout=0.2, poll=0.05)
    finally:
        devices.release_devices()


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setenv("SDXL_GPUS", "")
    assert devices.claim_devices(1).torch_device == "cpu"
    assert devices.claim_devices(0).devices == ()


def test_asking_for_more_devices_than_exist_fails_at_once(monkeypatch):
    monkeypatch.setenv("SDXL_GPUS", "0,1")
    with pytest.raises(RuntimeError, match="asks for 3 GPU"):
        devices.claim_devices(3)


def test_module_does_not_import_torch():
    code = "import sys, sdxl.devices; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
