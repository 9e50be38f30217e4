"""Scan and validate an image+caption folder so nothing downstream ever sees a bad item.

Layout (the seed project's): `photo.jpg` + `photo.txt` side by side, in any subfolder.
Images are .jpg/.jpeg/.png/.webp in any letter case; captions are UTF-8 `.txt` files with
the same stem (a BOM is tolerated). Files and folders whose name starts with "." are ignored.
Every image is decoded in full, EXIF-rotated and converted to RGB exactly as training will
see it, so the sizes in the manifest are the real ones.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from sdxl.progress import track
from sdxl.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION = ".txt"
# Shorter side below this is upscaled a lot even for the 512 family and teaches blur.
DEFAULT_MIN_SIZE = 256
MAX_CLIP_TOKENS = 77  # CLIP's context, including the start and end tokens
POLICIES = ("skip", "fail")
MAX_LISTED_PROBLEMS = 20  # in a DatasetError message; the problems table has all of them


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message names the files and what to do."""


@dataclass(frozen=True)
class Item:
    """One usable training example."""

    key: str  # path relative to the dataset folder, POSIX style: unique and stable
    path: str  # the data_dir given to validate_dataset joined with key
    caption: str
    width: int  # after EXIF rotation
    height: int
    sha256: str  # of the decoded RGB pixels: the same for the same picture in any format
    subset: int = 0  # which data subset (sdxl.data.subsets) it came from


@dataclass(frozen=True)
class CaptionRule:
    """Where an image's caption comes from and what is added to it (kohya's subset keys)."""

    extension: str = CAPTION_EXTENSION
    prefix: str = ""  # joined with a space, as kohya does
    suffix: str = ""
    class_tokens: str | None = None  # the caption of an image without a caption file

    def apply(self, caption: str) -> str:
        return " ".join(part for part in (self.prefix, caption, self.suffix) if part)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file, and what to do about it."""

    file: str  # relative to the dataset folder
    kind: str  # missing_caption, empty_caption, unreadable_caption, undecodable_image,
    # too_small, duplicate, orphan_caption (errors) or long_caption (a warning)
    reason: str
    fix: str
    dropped: bool  # False for warnings: the item is still used


@dataclass(frozen=True)
class ValidationResult:
    """The usable items of a dataset folder and every problem found in it."""

    data_dir: str
    items: tuple[Item, ...]
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        """Problems that removed a file from the dataset."""
        return tuple(p for p in self.problems if p.dropped)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """Problems that left the item in the dataset."""
        return tuple(p for p in self.problems if not p.dropped)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.data_dir}: {len(self.items)} items kept, {len(self.errors)} files dropped, "
            f"{len(self.warnings)} warnings"
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; PIL's own convert clips everything above 255 to white."""
    array = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or array.max(initial=0) > 255:
        array = array / 257.0
    grey = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    has_alpha = "A" in image.mode or "a" in image.mode or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image in full, apply its EXIF orientation and return it as RGB."""
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not in a worker
        upright = ImageOps.exif_transpose(image)  # a loaded copy
    return to_rgb(upright)


def read_caption(path: str | os.PathLike) -> str:
    """A caption file as one line of text; raises UnicodeDecodeError for non-UTF-8 files."""
    text = Path(path).read_bytes().decode("utf-8-sig")  # "-sig" drops a leading BOM
    return " ".join(text.split())


def pixel_hash(image: Image.Image) -> str:
    """sha256 of the size and RGB pixels: identical pictures match whatever the file."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Scanning


def _is_hidden(rel: Path) -> bool:
    """Dotfiles and dot-folders (.git, .ipynb_checkpoints, macOS ._ files) are never data."""
    return any(part.startswith(".") for part in rel.parts)


def scan_dataset(
    data_dir: str | os.PathLike, caption_extension: str = CAPTION_EXTENSION
) -> tuple[list[Path], list[Path]]:
    """(images, captions) under data_dir, relative to it, recursive, sorted by POSIX path."""
    root = Path(data_dir)
    images, captions = [], []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if _is_hidden(rel) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(rel)
        elif suffix == caption_extension.lower():
            captions.append(rel)
    return sorted(images, key=Path.as_posix), sorted(captions, key=Path.as_posix)


# ---------------------------------------------------------------------------------------------
# Validation


def _problem(rel: Path, kind: str, reason: str, fix: str, dropped: bool = True) -> Problem:
    return Problem(rel.as_posix(), kind, reason, fix, dropped)


def _check_caption(
    root: Path, image_rel: Path, caption_rel: Path | None, rule: CaptionRule
) -> str | Problem:
    """The caption of one image (the rule's prefix and suffix added), or why it cannot be read."""
    expected = image_rel.with_suffix(rule.extension).as_posix()
    if caption_rel is None and rule.class_tokens:
        return rule.apply(rule.class_tokens)
    if caption_rel is None:
        return _problem(
            image_rel,
            "missing_caption",
            f"no caption file {expected}",
            f"write the caption (UTF-8 text) into {expected}, or delete the image",
        )
    try:
        caption = read_caption(root / caption_rel)
    except UnicodeDecodeError as err:
        return _problem(
            image_rel,
            "unreadable_caption",
            f"{caption_rel.as_posix()} is not UTF-8 text ({err.reason} at byte {err.start})",
            f"re-save {caption_rel.as_posix()} with UTF-8 encoding",
        )
    except OSError as err:
        return _problem(
            image_rel,
            "unreadable_caption",
            f"cannot read {caption_rel.as_posix()}: {err.strerror or err}",
            f"check that {caption_rel.as_posix()} is a readable file",
        )
    if not caption:
        return _problem(
            image_rel,
            "empty_caption",
            f"caption file {caption_rel.as_posix()} is empty",
            f"write a caption into {caption_rel.as_posix()}, or delete the image",
        )
    return rule.apply(caption)


def _check_image(root: Path, rel: Path, min_size: int) -> Image.Image | Problem:
    """The decoded image, or the problem that makes it unusable."""
    try:
        image = load_image(root / rel)
    except Exception as err:  # PIL raises many types for corrupt files; all mean "bad file"
        return _problem(
            rel,
            "undecodable_image",
            f"cannot decode image ({type(err).__name__}: {err})",
            "re-export it as PNG or JPEG (the file may be truncated or not an image), or delete it",
        )
    if min(image.size) < min_size:
        return _problem(
            rel,
            "too_small",
            f"image is {image.width}x{image.height}; shorter side {min(image.size)} < "
            f"min_size {min_size}",
            "use a larger original, or lower min_size if upscaling is acceptable",
        )
    return image


def _check_pair(
    root: Path, rel: Path, caption_rel: Path | None, min_size: int, rule: CaptionRule
) -> tuple[Item | None, list[Problem]]:
    """(item or None, problems) for one image file; reports caption and image problems both."""
    caption = _check_caption(root, rel, caption_rel, rule)
    image = _check_image(root, rel, min_size)
    problems = [p for p in (caption, image) if isinstance(p, Problem)]
    if problems:
        return None, problems
    item = Item(rel.as_posix(), str(root / rel), caption, *image.size, pixel_hash(image))
    return item, []


def _orphan_captions(
    root: Path, images: list[Path], captions: list[Path], extension: str
) -> list[Problem]:
    """Caption files with no image of a supported type beside them."""
    stems = {rel.with_suffix("") for rel in images}
    problems = []
    for rel in captions:
        if rel.with_suffix("") in stems:
            continue
        others = sorted(
            p.name
            for p in (root / rel).parent.glob(f"{rel.stem}.*")
            if p.suffix.lower() != extension.lower()
        )
        fix = (
            f"convert {others[0]} to PNG, JPEG or WebP"
            if others
            else "add the image beside it (.jpg/.jpeg/.png/.webp, same name), or delete it"
        )
        problems.append(_problem(rel, "orphan_caption", "caption file has no image", fix))
    return problems


def _drop_duplicates(candidates: list[Item]) -> tuple[list[Item], list[Problem]]:
    """Keep the first item (in sorted order) of each set of identical pictures."""
    first_with: dict[str, str] = {}
    items, problems = [], []
    for item in candidates:
        if item.sha256 in first_with:
            problems.append(
                _problem(
                    Path(item.key),
                    "duplicate",
                    f"same picture as {first_with[item.sha256]}",
                    "delete one of the copies (merge their captions first if they differ)",
                )
            )
            continue
        first_with[item.sha256] = item.key
        items.append(item)
    return items, problems


def _token_count(tokenizer: Callable, caption: str) -> int:
    """Number of tokens (with start/end) from a Hugging Face tokenizer or any text -> ids."""
    encoded = tokenizer(caption)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return len(ids)


def _long_captions(items: list[Item], tokenizer: Callable, max_tokens: int) -> list[Problem]:
    """Warnings for captions CLIP will cut off; the items stay in the dataset."""
    problems = []
    for item in items:
        count = _token_count(tokenizer, item.caption)
        if count > max_tokens:
            problems.append(
                _problem(
                    Path(item.key),
                    "long_caption",
                    f"caption is {count} CLIP tokens; truncated at {max_tokens} tokens",
                    "shorten the caption if its end matters (text past the limit is ignored)",
                    dropped=False,
                )
            )
    return problems


def _format_problems(root: Path, problems: Sequence[Problem], header: str) -> str:
    """A short multi-line listing for an exception message."""
    lines = [header]
    for p in problems[:MAX_LISTED_PROBLEMS]:
        lines.append(f"  {p.file}: {p.reason} -> {p.fix}")
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(
            f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more "
            "(validate with policy='skip' and write_problems() for the full table)"
        )
    return "\n".join(lines)


def _apply_policy(result: ValidationResult, policy: str, n_images: int, skip_hint: str) -> None:
    """Raise for policy 'fail' (or an empty result); otherwise log what was dropped."""
    root = Path(result.data_dir)
    errors = result.errors
    if policy == "fail" and errors:
        n_files = len({p.file for p in errors})
        header = (
            f"dataset {root}: {len(errors)} problem(s) in {n_files} file(s) "
            f"(policy 'fail'); fix them or {skip_hint}:"
        )
        raise DatasetError(_format_problems(root, errors, header))
    for p in errors:
        log.warning("skipping %s: %s (%s)", p.file, p.reason, p.fix)
    for p in result.warnings:
        log.warning("%s: %s", p.file, p.reason)
    if not result.items:
        if n_images == 0:
            raise DatasetError(
                f"dataset {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} "
                "in any letter case, in all subfolders); put image + same-name .txt caption pairs there"
            )
        header = f"dataset {root}: no usable items left; all {n_images} image(s) were dropped:"
        raise DatasetError(_format_problems(root, errors, header))
    log.info("%s", result.summary())


def validate_dataset(
    data_dir: str | os.PathLike,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    policy: str = "skip",
    tokenizer: Callable | None = None,
    max_tokens: int = MAX_CLIP_TOKENS,
    progress: bool = False,
    skip_hint: str = "use policy 'skip' to drop these files",
    captions: CaptionRule = CaptionRule(),
) -> ValidationResult:
    """Decode every image and read every caption under data_dir; drop or refuse bad ones.

    policy 'skip' drops bad files (logged, and listed in `problems`); 'fail' raises one
    DatasetError listing them. A `tokenizer` (a CLIP tokenizer, or any text -> ids callable)
    turns on the warning for captions longer than `max_tokens`. Images whose shorter side
    is below `min_size` (default 256 px) are dropped. An empty result always raises.
    `skip_hint` tells how the caller's user switches to 'skip' (a flag, a config key).
    `captions` says where captions come from (kohya's caption_extension, class_tokens, ...).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    images, caption_files = scan_dataset(root, captions.extension)
    caption_of = {rel.with_suffix(""): rel for rel in reversed(caption_files)}  # first one wins
    candidates, problems = [], []
    for rel in track(images, "validate", "image", disable=not progress):
        caption_rel = caption_of.get(rel.with_suffix(""))
        candidate, found = _check_pair(root, rel, caption_rel, min_size, captions)
        problems += found
        if candidate is not None:
            candidates.append(candidate)
    items, duplicates = _drop_duplicates(candidates)
    problems += duplicates + _orphan_captions(root, images, caption_files, captions.extension)
    if tokenizer is not None:
        problems += _long_captions(items, tokenizer, max_tokens)
    problems.sort(key=lambda p: p.file)  # stable: one file's problems keep their order
    result = ValidationResult(str(root), tuple(items), tuple(problems))
    _apply_policy(result, policy, len(images), skip_hint)
    return result


# ---------------------------------------------------------------------------------------------
# Manifest and problems table

ITEM_COLUMNS = tuple(f.name for f in fields(Item))
PROBLEM_COLUMNS = tuple(f.name for f in fields(Problem))


def _items_of(result: ValidationResult | Sequence[Item]) -> Sequence[Item]:
    return result.items if isinstance(result, ValidationResult) else result


def _manifest_format(path: Path) -> str:
    """'csv' or 'jsonl' from the file name; anything else is a user error."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"manifest {path}: use a .csv or .jsonl file name, not {suffix!r}")
    return suffix[1:]


def write_manifest(result: ValidationResult | Sequence[Item], path: str | os.PathLike) -> None:
    """Write the items as CSV or JSON Lines (by suffix), atomically."""
    path = Path(path)
    fmt = _manifest_format(path)
    frame = pd.DataFrame([asdict(item) for item in _items_of(result)], columns=ITEM_COLUMNS)
    if fmt == "csv":
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, encoding="utf-8")
    else:
        text = frame.to_json(orient="records", lines=True, force_ascii=False)
        atomic_write_text(path, text if text.endswith("\n") or not text else text + "\n")


def read_manifest(path: str | os.PathLike) -> list[Item]:
    """Items from a manifest written by write_manifest (captions are never parsed as NaN)."""
    path = Path(path)
    if _manifest_format(path) == "csv":
        text_columns = {c: str for c in ITEM_COLUMNS if c not in ("width", "height", "subset")}
        frame = pd.read_csv(path, dtype=text_columns, keep_default_na=False, encoding="utf-8")
    else:
        frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False, encoding="utf-8")
    if "subset" not in frame.columns:  # a manifest of one folder, from before subsets
        frame["subset"] = 0
    missing = [c for c in ITEM_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {missing}; regenerate it")
    return [_item_from_row(row) for row in frame[list(ITEM_COLUMNS)].to_dict("records")]


def _item_from_row(row: dict[str, Any]) -> Item:
    return Item(
        key=str(row["key"]),
        path=str(row["path"]),
        caption=str(row["caption"]),
        width=int(row["width"]),
        height=int(row["height"]),
        sha256=str(row["sha256"]),
        subset=int(row["subset"]),
    )


def problems_frame(result: ValidationResult) -> pd.DataFrame:
    """The problems as a table, one row per problem."""
    return pd.DataFrame([asdict(p) for p in result.problems], columns=PROBLEM_COLUMNS)


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Dataset problems</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}}</style>
</head><body>
<h2>Dataset problems: {data_dir}</h2>
<p>{summary}</p>
{table}
</body></html>
"""


def write_problems(
    result: ValidationResult, tsv_path: str | os.PathLike, html_path: str | os.PathLike
) -> None:
    """Write the problems as a TSV and as a small HTML page for the report, atomically."""
    frame = problems_frame(result)
    with atomic_path(tsv_path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, encoding="utf-8")
    table = frame.to_html(index=False, escape=True, border=0) if len(frame) else ""
    page = _HTML.format(
        data_dir=html.escape(result.data_dir),
        summary=html.escape(result.summary()) + ("" if len(frame) else ". No problems found."),
        table=table,
    )
    atomic_write_text(html_path, page)
