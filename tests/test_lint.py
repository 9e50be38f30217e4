"""The code style gate runs with the tests, so CI enforces it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    return shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"


def test_ruff_check_is_clean():
    result = subprocess.run([_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_never_imports_reference_packages():
    pattern = re.compile(r"^\s*(?:import|from)\s+(?:diffusers|peft|accelerate)\b", re.MULTILINE)
    for path in (ROOT / "sdxl").rglob("*.py"):
        match = pattern.search(path.read_text())
        assert match is None, f"{path.relative_to(ROOT)} imports a test-only package: {match[0]!r}"


def test_ruff_format_is_clean():
    cmd = [_ruff(), "format", "--check", "."]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
