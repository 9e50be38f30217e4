"""Prompts from a COCO captions file (`captions_val2014.json`, `captions_val2017.json`, ...).

The file is recognised by its content: a JSON object with `images` (each with an `id`) and
`annotations` (each with an `image_id` and a `caption`). `coco_captions` picks the captions:
`first` (the first caption of each image, in file order: one generated image per COCO image),
`all` (one per annotation) or `random` (one caption per image, chosen from the seed and the
image id). The chosen (image, caption) list, in image-id order, is shuffled with the seed and
its first num_images are taken (COCO-30k style): the same seed picks the same COCO images in
`first` and `random` mode, and raising num_images keeps the images already chosen.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from sdxl.errors import UserError

COCO_MODES = ("first", "all", "random")
# What an image records of its source COCO image (and captions.json keeps), when known.
SOURCE_KEYS = ("coco_image_id", "coco_file_name", "coco_url")


def check_coco_mode(mode: str, flag: str = "--coco-captions") -> None:
    if mode not in COCO_MODES:
        raise ValueError(f"{flag} must be one of {', '.join(COCO_MODES)}, got {mode!r}")


def read_coco_file(path: Path) -> dict | None:
    """The parsed file if it is a COCO captions file (checked), None if it is a text file.

    A `.json` file, or text that parses as a JSON object with COCO's keys, must be a valid
    COCO captions file: anything wrong is one UserError naming the file and the problem.
    """
    with path.open("rb") as f:
        head = f.read(64).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("{") and path.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        if path.suffix.lower() != ".json":
            return None  # a prompt file whose first prompt starts with '{'
        raise UserError(f"{path}: not valid JSON ({err}); give a COCO captions file "
                        "(captions_val2017.json) or a text file, one prompt per line") from None  # fmt: skip
    coco_keys = isinstance(data, dict) and ({"images", "annotations"} & data.keys()
                                            or data.get("type") == "captions")  # fmt: skip
    if not coco_keys:
        if path.suffix.lower() != ".json":
            return None
        raise UserError(f"{path}: a JSON file but not a COCO captions file (an object with "
                        "'images' and 'annotations'); give captions_*.json or a text file")  # fmt: skip
    check_coco(path, data)
    return data


def _fail(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: not a usable COCO captions file: {problem}")


def check_coco(path: Path, data: dict) -> None:
    """Raise one UserError naming the first problem of a COCO captions file."""
    if data.get("type", "captions") != "captions":
        raise _fail(path, f"it is a COCO {data['type']!r} file; use a captions_*.json file")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise _fail(path, f"'{key}' is missing or not a list")
    ids = set()
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise _fail(path, f"images[{k}] has no integer 'id'")
        ids.add(image["id"])
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")):
            raise _fail(path, f"annotations[{k}] has no integer 'image_id'")
        if "caption" not in ann and ("bbox" in ann or "keypoints" in ann):
            raise _fail(path, "its annotations have no 'caption' (an instances or keypoints "
                        "file?); use captions_*.json")  # fmt: skip
        if not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            raise _fail(path, f"annotations[{k}] has no caption (a non-empty string)")
        if ann["image_id"] not in ids:
            raise _fail(path, f"annotations[{k}] is of image_id {ann['image_id']}, which is "
                        "not in 'images'")  # fmt: skip
    if not data["annotations"]:
        raise _fail(path, "it has no annotations (captions)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def choose_captions(data: dict, mode: str, seed: int) -> list[tuple[str, dict]]:
    """(caption, source) pairs of a checked COCO file in the mode's seeded order.

    source: coco_image_id and, when the file has them, coco_file_name and coco_url.
    """
    check_coco_mode(mode)
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:  # file order: the 'first' caption is the first listed
        captions.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
    images = {image["id"]: image for image in data["images"]}
    chosen = []
    for image_id in sorted(captions):  # image-id order: the file's image order does not matter
        caps = captions[image_id]
        if mode == "all":
            picks = caps
        elif mode == "random":
            picks = [caps[_pick(seed, image_id, len(caps))]]
        else:
            picks = caps[:1]
        chosen += [(c, _source(images[image_id])) for c in picks]
    random.Random(seed).shuffle(chosen)
    return chosen


def _pick(seed: int, image_id: int, n: int) -> int:
    """A caption index from (seed, image id) alone: editing another image changes nothing."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _source(image: dict) -> dict:
    source = {"coco_image_id": image["id"]}
    for key, name in (("file_name", "coco_file_name"), ("coco_url", "coco_url")):
        if isinstance(image.get(key), str):
            source[name] = image[key]
    return source


def coco_prompts(path: Path, data: dict, num_images: int, mode: str, seed: int,
                 mode_flag: str = "--coco-captions") -> tuple[list[str], list[dict]]:  # fmt: skip
    """The first `num_images` (caption, source) of the COCO file at `path`, as two lists.

    More images than the mode gives prompts is refused: cycling would repeat COCO images.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    check_coco_mode(mode, mode_flag)
    chosen = choose_captions(data, mode, seed)
    if num_images > len(chosen):
        hint = f" or use {mode_flag} all ({len(data['annotations'])})" if mode != "all" else ""
        raise UserError(f"{path}: {num_images} images asked for, but {mode_flag} {mode} gives "
                        f"{len(chosen)} prompts; ask for at most {len(chosen)} images{hint}")  # fmt: skip
    chosen = chosen[:num_images]
    return [c for c, _ in chosen], [s for _, s in chosen]
