"""The failures users are meant to see, and how they are shown: one line naming the fix.

The command-line tools and the workflow scripts print an expected failure as a single
`error: ...` line (no traceback unless asked for); anything else escaping them is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import sys


class UserError(Exception):
    """An expected failure (bad input, missing file, refused resume, busy folder, ...)."""


# What a user can cause and fix: bad flags and input (ValueError, our UserError) and files that
# are missing, unreadable, or do not fit on the disk (OSError). Anything else is a bug.
EXPECTED = (UserError, ValueError, OSError)


def one_line(err: BaseException) -> str:
    """The error as one line: its first line (an OSError also names its file)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text.splitlines()[0]


def report(err: BaseException) -> None:
    """`error: <one line>` on stderr; further lines of the message go to the log as details."""
    rest = str(err).strip().splitlines()[1:]
    if rest:
        logging.getLogger("sdxl").error("details:\n%s", "\n".join(rest))
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
