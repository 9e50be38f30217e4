"""Writing generated images: the seed's flat numbered layout, one atomic file at a time."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdxl.utils import atomic_path, atomic_write_text


def index_width(num_images: int) -> int:
    """Zero-padding so that lexical order is numeric for any count (at least 5, as the seed)."""
    return max(5, len(str(max(num_images - 1, 0))))


_A1111_KEYS = {"steps": "Steps", "sampler": "Sampler", "cfg_scale": "CFG scale", "seed": "Seed",
               "size": "Size", "model": "Model", "lora": "Lora"}  # fmt: skip


def parameters_text(meta: dict) -> str:
    """A1111's 'parameters' text: prompt, 'Negative prompt: ...', then 'Key: value' settings."""
    settings = ", ".join(
        f"{label}: {meta[key]}"
        for key, label in _A1111_KEYS.items()
        if meta.get(key) not in (None, "")
    )
    negative = (
        f"\nNegative prompt: {meta['negative_prompt']}" if meta.get("negative_prompt") else ""
    )
    return f"{meta['prompt']}{negative}\n{settings}"


def save_png(image: Image.Image, path: Path, meta: dict) -> None:
    """Save a PNG carrying its generation parameters (A1111 'parameters' + JSON 'sdxl')."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text("sdxl", json.dumps(meta, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def is_complete(path: Path) -> bool:
    """True when `path` is a PNG that decodes fully (a crashed write is regenerated)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # any decode failure means the file must be rewritten
        return False


def write_item(
    out_dir: Path, stem: str, image: Image.Image, meta: dict, save_json: bool, caption: bool = True
) -> None:
    """Write NNNNN.txt, optional NNNNN.json, then NNNNN.png last (its presence marks done)."""
    if caption:
        atomic_write_text(out_dir / f"{stem}.txt", meta["prompt"])
    if save_json:
        atomic_write_text(out_dir / f"{stem}.json", json.dumps(meta, indent=2))
    save_png(image, out_dir / f"{stem}.png", meta)
