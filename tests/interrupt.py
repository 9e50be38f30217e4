"""A training run stopped in this process as a kill would stop it: fast, no subprocess."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from sdxl.train import loop


class Killed(Exception):
    """The simulated kill."""


@contextlib.contextmanager
def killed_after_step(step: int) -> Iterator[None]:
    """The training run in this block dies as step `step` + 1 starts, so step `step` and all it
    saved are on disk: the place the kill -9 tests pause at (`step-N`), raised instead of waited."""

    def pause_point(name: str) -> None:
        if name == f"step-{step + 1}":
            raise Killed(name)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(loop, "pause_point", pause_point)
        yield
