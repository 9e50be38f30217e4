"""Building the global prompt list: image i always gets prompts[i]."""

from __future__ import annotations

import random
from pathlib import Path


def index_width(num_images: int) -> int:
    """Zero-padding of image i's file name so that lexical order is numeric for any count (at
    least 5 digits, as the seed). Here, free of heavy imports: the workflow reads it at parse time."""
    return max(5, len(str(max(num_images - 1, 0))))


def read_prompt_file(path: str | Path, flag: str = "--prompt-file") -> list[str]:
    """One prompt per line; blank lines skipped. Errors name the file, `flag` and the fix.

    `flag`: the option or config key the path came from, as the user wrote it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found; give {flag} an existing file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: the prompt file has no prompts; write one prompt per line")
    return prompts


def expand_prompts(
    prompts: list[str], num_images: int, shuffle: bool = False, seed: int = 0
) -> list[str]:
    """Cycle or truncate `prompts` to `num_images`, optionally shuffled with `seed` first."""
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    prompts = list(prompts)
    if shuffle:
        random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(num_images)]


def load_prompts(path: str | Path, num_images: int, *, shuffle: bool = False, seed: int = 0,
                 coco_captions: str = "first", flag: str = "--prompt-file",
                 mode_flag: str = "--coco-captions") -> tuple[list[str], list[dict]]:  # fmt: skip
    """The prompts of images 0..num_images-1 from a prompt file, and where each came from.

    A COCO captions file (see sdxl/generate/coco_prompts.py) gives its captions in a seeded
    order, each with its source image (coco_image_id, ...); a text file gives one prompt per
    line, cycled (and shuffled first if asked), with no sources.
    """
    from sdxl.generate.coco_prompts import check_coco_mode, coco_prompts, read_coco_file

    check_coco_mode(coco_captions, mode_flag)
    path = Path(path)
    coco = read_coco_file(path) if path.is_file() else None
    if coco is not None:
        return coco_prompts(path, coco, num_images, coco_captions, seed, mode_flag)
    return expand_prompts(read_prompt_file(path, flag), num_images, shuffle, seed), []
