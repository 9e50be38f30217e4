"""Expected failures end a command with one `error: ...` line; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from sdxl.errors import EXPECTED, report


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


@contextlib.contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
    """Turn an expected exception into `error: ...` on stderr and exit code 1."""
    try:
        yield
    except EXPECTED as err:
        if debug:
            raise
        report(err)
        raise SystemExit(1) from None
