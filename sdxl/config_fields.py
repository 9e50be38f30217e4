"""Strict construction of config dataclasses from plain dicts (YAML, JSON, TOML).

A misspelt key that were dropped would leave its setting at the default without a word, so
unknown keys are refused by name, with the closest known key as the likely fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from dataclasses import MISSING, fields
from typing import TypeVar

T = TypeVar("T")


def did_you_mean(key: str, known: Collection[str]) -> str | None:
    """'did you mean 'x'?' for the known key closest to a misspelt one, or None."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def unknown_keys_message(unknown: Collection[str], known: Collection[str], what: str) -> str:
    """The message for `unknown` keys of a `what` (e.g. "training settings")."""
    first = sorted(unknown)[0]
    hint = did_you_mean(first, known) or f"valid: {', '.join(known)}"
    return f"unknown {what} {', '.join(repr(k) for k in sorted(unknown))}; {hint}"


def from_dict(cls: type[T], values: Mapping, what: str) -> T:
    """`cls(**values)`, refusing keys that are not fields of `cls` and naming missing ones.

    Raises ValueError; the dataclass's own checks (`__post_init__`) run as usual.
    """
    known = [f.name for f in fields(cls)]
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(unknown_keys_message(unknown, known, what))
    for f in fields(cls):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{f.name} is required")
    return cls(**values)
