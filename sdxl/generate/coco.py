"""Dataset-level files of a generated dataset: COCO captions, metadata.jsonl, contact sheet."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sdxl.generate.coco_prompts import SOURCE_KEYS
from sdxl.images import fit_in_square, make_grid
from sdxl.utils import atomic_path, atomic_write_text


def coco_captions(records: Sequence[dict], description: str, date_created: str = "") -> dict:
    """A COCO captions file (info, licenses, images, annotations) that pycocotools loads.

    `records` are per-image dicts (image_meta) with index, file_name, width, height and prompt;
    image ids are the global indices, so ids agree with the file names. Images whose prompt is a
    COCO caption keep its source (coco_image_id, coco_file_name, coco_url).
    `date_created`: ISO date (default: today).
    """
    images = [
        {"id": r["index"], "file_name": r["file_name"], "width": r["width"], "height": r["height"],
         **{key: r[key] for key in SOURCE_KEYS if key in r}}
        for r in records
    ]  # fmt: skip
    annotations = [
        {"id": k + 1, "image_id": r["index"], "caption": r["prompt"]} for k, r in enumerate(records)
    ]
    date_created = date_created or datetime.date.today().isoformat()
    info = {
        "description": describe(records, description),
        "url": "",
        "version": "1.0",
        "year": int(date_created[:4]),
        "contributor": "sdxl-pipeline",
        "date_created": date_created,
    }
    return {"info": info, "licenses": licenses(records), "images": images,
            "annotations": annotations}  # fmt: skip


def describe(records: Sequence[dict], description: str) -> str:
    """`description` plus the weights by hash (model fingerprint, LoRA sha256) and the prompts'
    source, from the first record (all images of a dataset share them)."""
    if not records:
        return description
    r = records[0]
    parts = [f"model fingerprint {r['model_id']}"] if "model_id" in r else []
    parts += [f"model hash {r['model_hash']}"] if "model_hash" in r else []  # A1111's short one
    parts += [f"LoRA {lora['file']} (sha256 {lora['sha256']}, scale {lora['scale']:g})"
              for lora in r.get("loras", [])]  # fmt: skip
    if any("coco_image_id" in x for x in records):
        parts.append("prompts: COCO captions")
    return f"{description}; {'; '.join(parts)}" if parts else description


COCO_CAPTIONS_LICENSE = {
    "id": 1,
    "name": "Attribution 4.0 International (CC BY 4.0): the captions (the prompts), from the "
    "COCO dataset, (c) COCO Consortium",
    "url": "https://creativecommons.org/licenses/by/4.0/",
}


def licenses(records: Sequence[dict]) -> list[dict]:
    """COCO's captions license when prompts are COCO captions; nothing is claimed otherwise
    (the images' terms are those of the model and LoRA, which this file cannot know)."""
    return [COCO_CAPTIONS_LICENSE] if any("coco_image_id" in r for r in records) else []


def created_date(out_dir: Path, records: Sequence[dict]) -> str:
    """The UTC date of the newest image: a rerun that remakes nothing writes the same file."""
    newest = max(((out_dir / r["file_name"]).stat().st_mtime for r in records), default=None)
    if newest is None:
        return datetime.date.today().isoformat()
    return datetime.datetime.fromtimestamp(newest, datetime.UTC).date().isoformat()


DATASET_FILES = ("captions.json", "metadata.jsonl", "contact_sheet.png")


def write_dataset_files(
    out_dir: Path, records: Sequence[dict], description: str, sheet_size: int = 16
) -> None:
    """captions.json, metadata.jsonl and contact_sheet.png for the images in `records`."""
    captions, metadata, sheet = (out_dir / name for name in DATASET_FILES)
    coco = coco_captions(records, description, created_date(out_dir, records))
    atomic_write_text(captions, json.dumps(coco))
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
