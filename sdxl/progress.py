"""Progress of the long loops: a live tqdm bar on a terminal, plain lines in a log file.

A rule's log is no terminal, and a bar drawn there with carriage returns reads as one endless
line. So where the stream is not a tty, a bar is a plain line every 10% or 30 s, whichever
comes first, and one at the end:

    train: 120/400 steps (30%), 2.1 steps/s, ETA 2m13s, loss=0.1234, lr=1.00e-04

Inside a workflow job (workflow_scripts/common.py calls `show_on_console`), each bar also
sends a sparse line, prefixed with the job, to snakemake's console: at most every
$SDXL_CONSOLE_PROGRESS_S seconds (30), and one at the end. An update costs a clock read and a
comparison; the values shown are the ones the caller already holds (nothing is read back from
a device here).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO, TypeVar

from tqdm import tqdm

LOG_EVERY_S = 30.0
LOG_EVERY_FRACTION = 0.1
CONSOLE_ENV = "SDXL_CONSOLE_PROGRESS_S"
CONSOLE_EVERY_S = 30.0

_console: tuple[TextIO, str] | None = None  # (snakemake's stderr, the job's label)
T = TypeVar("T")


def show_on_console(stream: TextIO | None, label: str = "") -> None:
    """Also send sparse lines, prefixed `[label]`, to `stream` (None: stop)."""
    global _console
    _console = (stream, label) if stream is not None else None


class Progress:
    """A counter over `total` units shown as a tqdm bar on a tty, else as plain lines.

    `unit` is singular ("step", "image"); `clock` is for tests. Use it as a context manager,
    so that an error closes it first and its message starts a line of its own.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 disable: bool = False, position: int = 0, leave: bool = True,
                 stream: TextIO | None = None, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.stream = stream or sys.stderr
        self.every_s, self.clock, self.postfix = every_s, clock, {}
        self.disabled, self.closed, self.bar = disable, False, None
        self.began = self.logged_at = self.shown_at = clock()
        self.logged_n = self.shown_n = initial
        self.lines = 0  # plain lines written
        self.console = None if disable else _console
        self.console_every_s = _console_every_s()
        if not disable and _isatty(self.stream):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, position=position,
                            leave=leave, file=self.stream)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values) -> None:
        """Values shown after the count (loss=..., lr=...), from the next line on."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        now, end = self.clock(), self.n >= self.total
        step = max(1, math.ceil(self.total * LOG_EVERY_FRACTION))  # units between two lines
        due = self.n - self.logged_n >= step or now - self.logged_at >= self.every_s
        if self.bar is None and (end or due) and self.n != self.logged_n:
            self._log(now)
        due = now - self.shown_at >= self.console_every_s
        if self.console and (end or due) and self.n != self.shown_n:
            self._show(now)

    def close(self) -> None:
        """The last line where it stopped (unless already written), and close the bar."""
        if self.closed or self.disabled:
            self.closed = True
            return
        self.closed, now = True, self.clock()
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.logged_n or not self.lines:  # at least one line per bar
            self._log(now)
        if self.console and self.n != self.shown_n:
            self._show(now)

    def line(self, now: float, postfix: bool = True) -> str:
        """`120/400 steps (30%), 2.1 steps/s, ETA 2m13s, loss=...`; at the end the time taken."""
        total, n, seconds = self.total, self.n, now - self.began
        parts = [f"{n}/{total} {plural(self.unit)}" + (f" ({100 * n // total}%)" if total else "")]
        done = n - self.initial
        if done > 0 and seconds > 0:
            rate = done / seconds
            parts.append(f"{rate:.3g} {plural(self.unit)}/s" if rate >= 1
                         else f"{1 / rate:.3g} s/{self.unit}")  # fmt: skip
            if n < total:
                parts.append(f"ETA {duration((total - n) / rate)}")
        if n >= total:
            parts.append(f"done in {duration(seconds)}")
        if postfix:
            parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _log(self, now: float) -> None:
        self.logged_at, self.logged_n, self.lines = now, self.n, self.lines + 1
        _write(self.stream, f"{self.desc}: {self.line(now)}")

    def _show(self, now: float) -> None:
        self.shown_at, self.shown_n = now, self.n
        stream, label = self.console
        if not _write(stream, f"[{label}] {self.line(now, postfix=False)}"):
            self.console = None  # snakemake is gone: the job stops on its own (sdxl.procs)


def track(items: Sequence[T], desc: str, unit: str = "it", **kwargs) -> Iterator[T]:
    """Iterate over `items`, counting each one done after the loop body ran."""
    with Progress(len(items), desc, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update(1)


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def duration(seconds: float) -> str:
    """13s, 2m13s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _write(stream: TextIO, line: str) -> bool:
    """One line, flushed; False when the stream is closed or its reader gone."""
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        return False
    return True


def _console_every_s() -> float:
    """$SDXL_CONSOLE_PROGRESS_S, or the default when unset or not a number (a job must not
    fail over how often it reports)."""
    try:
        return float(os.environ.get(CONSOLE_ENV, CONSOLE_EVERY_S))
    except ValueError:
        return CONSOLE_EVERY_S
