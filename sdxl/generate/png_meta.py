"""What a generated PNG records, read back: the JSON of its parameters ('sdxl' text chunk) and
A1111's 'parameters' text, from complete files only.

Apart from sdxl/generate/writers.py so that the evaluation, which reads the recorded prompts,
does not depend on how images are written (its code inputs are derived from imports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from PIL import Image

META_KEY = "sdxl"  # the PNG text chunk holding image_meta as JSON
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last 12 bytes (empty IEND chunk + its CRC)


def recorded_meta(path: Path) -> str | None:
    """The 'sdxl' text of a complete PNG, or None if it is missing, cut short or not ours."""
    texts = recorded_texts(path)
    return texts[0] if texts else None


def recorded_texts(path: Path) -> tuple[str, str | None] | None:
    """The 'sdxl' and 'parameters' texts of a complete PNG of ours, else None.

    Reads the chunks before the pixel data and the last 12 bytes, never the pixels: writes are
    atomic, so a file at the final name is whole unless damaged afterwards, and decoding every
    image would make the resume check of a large dataset take hours.
    """
    try:
        with open(path, "rb") as f:
            if not _ends_with_iend(f):
                return None
            with Image.open(f, formats=["PNG"]) as im:
                text, params = im.info.get(META_KEY), im.info.get("parameters")
    except (OSError, SyntaxError, ValueError):  # not a file, not a PNG, damaged chunks
        return None
    if not isinstance(text, str):
        return None
    return text, params if isinstance(params, str) else None


def _ends_with_iend(f: BinaryIO) -> bool:
    """True when the open file ends with a PNG's IEND chunk (a cut-short file does not)."""
    if f.seek(0, os.SEEK_END) < len(_IEND):
        return False
    f.seek(-len(_IEND), os.SEEK_END)
    whole = f.read() == _IEND
    f.seek(0)
    return whole
