"""Progress in a log file is plain lines at a sensible interval; on a terminal, tqdm's bar.

Also what a person reads in `--help`: the CLIs' examples as they are typed.
"""

from __future__ import annotations

import io
import re

import pytest

from sdxl import progress
from sdxl.progress import Progress, duration, track


class Clock:
    """A fake time.monotonic: `now` moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_console(monkeypatch):
    """No console unless a test gives one (the module keeps it globally)."""
    monkeypatch.setattr(progress, "_console", None)
    monkeypatch.delenv(progress.CONSOLE_ENV, raising=False)


def _run(total: int, seconds_per_unit: float, **kwargs) -> list[str]:
    log, clock = io.StringIO(), Clock()
    with Progress(total, "train", "step", stream=log, clock=clock, **kwargs) as bar:
        for _ in range(total):
            clock.now += seconds_per_unit
            bar.update(1)
    assert "\r" not in log.getvalue()
    return log.getvalue().splitlines()


def test_a_log_gets_a_line_every_tenth_and_one_at_the_end():
    lines = _run(400, 0.5)
    assert len(lines) == 10
    assert lines[2] == "train: 120/400 steps (30%), 2 steps/s, ETA 2m20s"
    assert lines[-1] == "train: 400/400 steps (100%), 2 steps/s, done in 3m20s"


def test_a_slow_loop_gets_a_line_every_30_seconds():
    lines = _run(1000, 10.0)  # 10% would be 1000 s apart
    assert lines[0] == "train: 3/1000 steps (0%), 10 s/step, ETA 2h46m"
    assert [int(re.match(r"train: (\d+)/", line)[1]) for line in lines[:4]] == [3, 6, 9, 12]
    assert lines[-1].startswith("train: 1000/1000 steps (100%)") and "done in 2h46m" in lines[-1]


def test_a_small_total_gets_a_line_per_unit_and_no_repeated_end():
    lines = _run(3, 1.0)
    assert [line.split(",")[0] for line in lines] == [
        "train: 1/3 steps (33%)",
        "train: 2/3 steps (66%)",
        "train: 3/3 steps (100%)",
    ]


def test_the_postfix_and_a_resumed_start_are_in_the_lines():
    log, clock = io.StringIO(), Clock()
    with Progress(10, "train", "step", initial=5, stream=log, clock=clock) as bar:
        for step in range(6, 11):
            clock.now += 2.0
            bar.set_postfix(loss=f"{1 / step:.4f}", lr="1.00e-04")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert lines[0] == "train: 6/10 steps (60%), 2 s/step, ETA 8s, loss=0.1667, lr=1.00e-04"
    assert lines[-1] == "train: 10/10 steps (100%), 2 s/step, done in 10s, loss=0.1000, lr=1.00e-04"


def test_a_bar_closed_early_says_where_it_stopped():
    log, clock = io.StringIO(), Clock()
    bar = Progress(100, "latents", "image", stream=log, clock=clock)
    with pytest.raises(RuntimeError), bar:
        clock.now += 1.0
        bar.update(4)
        raise RuntimeError
    assert log.getvalue() == "latents: 4/100 images (4%), 4 images/s, ETA 24s\n"


def test_track_counts_each_item_and_disable_writes_nothing():
    log = io.StringIO()
    assert list(track(range(5), "validate", "image", stream=log)) == [0, 1, 2, 3, 4]
    assert log.getvalue().splitlines()[-1].startswith("validate: 5/5 images (100%)")
    quiet = io.StringIO()
    assert list(track([1, 2], "validate", "image", stream=quiet, disable=True)) == [1, 2]
    assert quiet.getvalue() == ""


def test_a_terminal_keeps_the_live_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    with Progress(3, "images[cpu]", "image", stream=term) as bar:
        bar.update(3)
    assert bar.bar is not None and "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_the_console_gets_sparse_lines_named_after_the_job(monkeypatch):
    console, log, clock = io.StringIO(), io.StringIO(), Clock()
    progress.show_on_console(console, "generate shard-1")
    monkeypatch.setenv(progress.CONSOLE_ENV, "60")
    with Progress(100, "images[cpu]", "image", stream=log, clock=clock) as bar:
        for _ in range(100):
            clock.now += 5.0
            bar.set_postfix(loss="0.1")  # the log's detail only
            bar.update(1)
    lines = console.getvalue().splitlines()
    assert lines[0] == "[generate shard-1] 12/100 images (12%), 5 s/image, ETA 7m20s"
    assert len(lines) == 100 * 5 // 60 + 1  # every 60 s, and the end
    assert lines[-1] == "[generate shard-1] 100/100 images (100%), 5 s/image, done in 8m20s"
    assert len(log.getvalue().splitlines()) > len(lines)  # the log: every 30 s


def test_a_short_job_shows_only_its_end_on_the_console():
    console = io.StringIO()
    progress.show_on_console(console, "cache_text")
    assert len(list(track(range(7), "text", "caption", stream=io.StringIO()))) == 7
    assert console.getvalue().count("\n") == 1
    assert console.getvalue().startswith("[cache_text] 7/7 captions (100%)")


def test_durations():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == [
        "0s", "59s", "1m01s", "59m59s", "1h00m", "2h02m"
    ]  # fmt: skip


@pytest.mark.parametrize("cli", ["train", "generate", "evaluate"])
def test_help_examples_read_as_typed(cli):
    """The description's example lines keep their line continuations: no gap of spaces."""
    import importlib

    parser = importlib.import_module(f"sdxl.cli.{cli}").build_parser()
    description = parser.format_help().split("\noptions:")[0]
    assert "Example" in description
    for line in description.splitlines():
        assert not re.search(r"\S {2,}\S", line), line
    continued = [line for line in description.splitlines() if line.endswith(" \\")]
    assert continued, "an example spread over lines ends them with a backslash"


def test_the_sampling_callback_draws_a_bar_per_run(capsys):
    """generate(batch_invariant=True) runs the sampler once per image through one callback."""
    from sdxl.sampling.loop import progress_bar

    callback = progress_bar(2)
    for _image in range(3):
        for i in range(2):
            callback(i, None, None)
    lines = capsys.readouterr().err.splitlines()
    runs = ["sampling: 1/2 steps (50%)", "sampling: 2/2 steps (100%)"] * 3
    assert [line.split(",")[0] for line in lines] == runs
