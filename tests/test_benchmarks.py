"""The GPU suite runs end to end on the CPU with the tiny model, so it is ready when a GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_eager_stage(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--eager-only",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] and all(s["rows"] and not s["error"] for s in stages)
    # Parity with diffusers is measured and printed, not only timed.
    assert "max rel err vs diffusers" in stages[0]["output"]
    assert "max pixel diff ours vs diffusers" in "".join(s["output"] for s in stages)
    text = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"## {s['name']}" in text for s in stages)
