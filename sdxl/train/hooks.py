"""A test-only pause point, so the kill -9 tests can stop a trainer at an exact place.

Set SDXL_TRAIN_PAUSE_AT to a point name ("cache": latents built, text not yet; "step-N":
inside optimizer step N, its batch staged, before its update; "checkpoint:<file name>": that checkpoint
is written to its temp file but not yet renamed) and
SDXL_TRAIN_PAUSE_FILE to a path: the trainer writes its pid there on reaching that point and
then waits to be killed. Unset (always, outside tests), a pause point does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "SDXL_TRAIN_PAUSE_AT"
PAUSE_FILE = "SDXL_TRAIN_PAUSE_FILE"


def pause_point(name: str) -> None:
    """Stop here (for the killing test) when SDXL_TRAIN_PAUSE_AT names this point."""
    if os.environ.get(PAUSE_AT) != name:
        return
    Path(os.environ[PAUSE_FILE]).write_text(str(os.getpid()))
    time.sleep(600)  # the test kills the process long before this ends
    raise SystemExit(f"pause point {name!r} was never killed")
