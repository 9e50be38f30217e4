"""The one exception type users are meant to see: its message names the file or flag and the fix.

The command-line tools print such an error as a single `error: ...` line (no traceback unless
`--debug`); anything else escaping them is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure (bad input, missing file, refused resume, busy folder, ...)."""
