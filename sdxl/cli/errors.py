"""Expected failures end a command with one `error: ...` line; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from sdxl.errors import UserError

# What a user can cause and fix: bad flags and input (ValueError, our UserError) and files that
# are missing, unreadable, or do not fit on the disk (OSError). Anything else is a bug.
EXPECTED = (UserError, ValueError, OSError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def one_line(err: BaseException) -> str:
    """The error as one line (multi-line messages keep their first line; the rest is logged)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text.splitlines()[0]


@contextlib.contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
    """Turn an expected exception into `error: ...` on stderr and exit code 1."""
    try:
        yield
    except EXPECTED as err:
        if debug:
            raise
        rest = str(err).strip().splitlines()[1:]
        if rest:
            logging.getLogger("sdxl").error("details:\n%s", "\n".join(rest))
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
