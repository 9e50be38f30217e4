"""Which files of a folder are images to evaluate, and in which order: one rule for the
workflow, which lists reference images when it is parsed (so no torch here), and the feature
jobs, which slice the same list."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_paths(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder`, recursively, in sorted path order."""
    found = Path(folder).rglob("*")
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
