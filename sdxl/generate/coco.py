"""Dataset-level files of a generated dataset: COCO captions, metadata.jsonl, contact sheet."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sdxl.images import fit_in_square, make_grid
from sdxl.utils import atomic_path, atomic_write_text


def coco_captions(records: Sequence[dict], description: str) -> dict:
    """A COCO captions file (info, images, annotations) that pycocotools loads.

    `records` are per-image dicts with index, file_name, width, height and prompt; image ids are
    the global indices, so ids agree with the file names.
    """
    images = [
        {"id": r["index"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
        for r in records
    ]
    annotations = [
        {"id": k + 1, "image_id": r["index"], "caption": r["prompt"]} for k, r in enumerate(records)
    ]
    info = {"description": description, "version": "1.0", "contributor": "sdxl-pipeline"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


DATASET_FILES = ("captions.json", "metadata.jsonl", "contact_sheet.png")


def write_dataset_files(
    out_dir: Path, records: Sequence[dict], description: str, sheet_size: int = 16
) -> None:
    """captions.json, metadata.jsonl and contact_sheet.png for the images in `records`."""
    captions, metadata, sheet = (out_dir / name for name in DATASET_FILES)
    atomic_write_text(captions, json.dumps(coco_captions(records, description)))
    atomic_write_text(metadata, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if records:
        write_contact_sheet(out_dir, records[:sheet_size], sheet)
    else:
        sheet.unlink(missing_ok=True)


def remove_dataset_files(out_dir: Path) -> None:
    """Remove the dataset-level files (a folder rewritten in the simple format has none)."""
    for name in DATASET_FILES:
        (out_dir / name).unlink(missing_ok=True)


def write_contact_sheet(
    image_dir: Path, records: Sequence[dict], path: Path, cell: int = 256
) -> None:
    """A grid of thumbnails with their prompts, for a quick look at a dataset."""
    thumbs = []
    for r in records:
        with Image.open(image_dir / r["file_name"]) as im:
            thumbs.append(fit_in_square(im, cell))
    grid = make_grid(thumbs, [r["prompt"] for r in records], caption_lines=3)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
