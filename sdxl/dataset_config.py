"""Dataset subsets as kohya sd-scripts has them: several image folders, each with its own
caption rules, repeats and role (training or regularization images).

`read_dataset_config` reads kohya's dataset config (TOML: `[general]`, `[[datasets]]`,
`[[datasets.subsets]]`, the lower level winning); the pipeline's `data.subsets:` list takes
the same subset keys (`subsets_from_list`). Unknown keys are refused by name, and kohya's own
keys that we do not implement are named as such, so a migrated file never half-works.

A subset's settings split in two: the caption rules (folder, extension, prefix, suffix,
class_tokens) decide the cached captions; the rest (repeats, is_reg, caption shuffling and
dropout, flips) decide only how training visits the cached items. `None` means the run's own
setting (--shuffle_caption, --keep_tokens, --caption_dropout, --random_flip).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from sdxl import config_fields

# kohya keys we read per dataset (resolution and batch size are the run's); per subset: Subset's.
DATASET_KEYS = ("resolution", "batch_size")
# The subset keys that decide the cached captions; the others only how training visits items.
CAPTION_KEYS = ("image_dir", "caption_extension", "caption_prefix", "caption_suffix",
                "class_tokens")  # fmt: skip
# kohya keys with no equivalent here: named in the error, so the user knows it is not a typo.
KOHYA_UNSUPPORTED = ("color_aug", "face_crop_aug_range", "random_crop", "caption_separator",
                     "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                     "resize_interpolation", "caption_dropout_every_n_epochs",
                     "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step",
                     "cache_info", "metadata_file", "alpha_mask", "conditioning_data_dir",
                     "bucket_no_upscale", "bucket_reso_steps", "min_bucket_reso",
                     "max_bucket_reso", "skip_image_resolution", "network_multiplier",
                     "custom_attributes", "validation_seed", "validation_split")  # fmt: skip
KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default when a config does not say


class DatasetConfigError(ValueError):
    """A dataset config (or data.subsets entry) that cannot be used; the message says where."""


@dataclass(frozen=True)
class Subset:
    """One image folder and how training uses it (kohya's [[datasets.subsets]] keys)."""

    image_dir: str
    num_repeats: int = 1  # visits of each image per epoch
    caption_extension: str = ".txt"
    caption_prefix: str = ""  # joined with a space, before shuffling (as kohya)
    caption_suffix: str = ""
    class_tokens: str | None = None  # the caption of images without a caption file
    is_reg: bool = False  # regularization (prior-preservation) images
    keep_tokens: int | None = None  # with shuffle_caption: leading comma pieces kept in place
    shuffle_caption: bool | None = None
    caption_dropout_rate: float | None = None
    flip_aug: bool | None = None

    def __post_init__(self):
        if not isinstance(self.image_dir, str) or not self.image_dir:
            raise ValueError("image_dir must be a folder path")
        _typed(self, "num_repeats", int, minimum=1)
        _typed(self, "keep_tokens", int, minimum=0, optional=True)
        for key in ("caption_extension", "caption_prefix", "caption_suffix"):
            _typed(self, key, str)
        _typed(self, "class_tokens", str, optional=True)
        for key in ("is_reg", "shuffle_caption", "flip_aug"):
            _typed(self, key, bool, optional=key != "is_reg")
        rate = self.caption_dropout_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0.0 <= rate < 1.0):  # fmt: skip
            raise ValueError(f"caption_dropout_rate must be a number in [0, 1), got {rate!r}")
        if not self.caption_extension.startswith("."):
            raise ValueError(
                f"caption_extension must start with '.', got {self.caption_extension!r}"
            )

    @property
    def captions(self):
        """What decides the cached captions of this subset (a sdxl.data.dataset.CaptionRule)."""
        from sdxl.data.dataset import CaptionRule

        return CaptionRule(self.caption_extension, self.caption_prefix, self.caption_suffix,
                           self.class_tokens)  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict, where: str) -> Subset:
        """A subset from kohya keys; `where` names the place for errors."""
        _check_keys(values, SUBSET_KEYS, where)  # kohya's options we lack are named as such
        try:
            return config_fields.from_dict(cls, values, "key")
        except (TypeError, ValueError) as err:
            raise DatasetConfigError(f"{where}: {err}") from None


SUBSET_KEYS = tuple(f.name for f in fields(Subset))


@dataclass(frozen=True)
class DatasetConfig:
    """A kohya dataset config: its subsets, and the resolution and batch size it sets."""

    subsets: tuple[Subset, ...]
    resolution: int | None = None
    batch_size: int | None = None


def read_dataset_config(path: str | os.PathLike) -> DatasetConfig:
    """Read kohya's dataset config TOML; relative image_dirs are relative to the working folder
    (as kohya resolves them). One clear DatasetConfigError for anything it cannot use."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetConfigError(f"--dataset_config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DatasetConfigError(
            f"--dataset_config {path}: not a readable TOML file ({err})"
        ) from None
    _check_keys(doc, ("general", "datasets"), f"{path}", sections=True)
    general = doc.get("general", {})
    _check_keys(general, (*SUBSET_KEYS, *DATASET_KEYS), f"{path} [general]", subset_only=True)
    datasets = doc.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]]; add one with [[datasets.subsets]]")
    subsets, sizes, batches = [], set(), set()
    for d, dataset in enumerate(datasets, 1):
        where = f"{path} [[datasets]] #{d}"
        inner = dataset.get("subsets", [])
        _check_keys({k: v for k, v in dataset.items() if k != "subsets"},
                    (*SUBSET_KEYS, *DATASET_KEYS), where, subset_only=True)  # fmt: skip
        if not isinstance(inner, list) or not inner:
            raise DatasetConfigError(f"{where}: no [[datasets.subsets]]; add one with image_dir")
        merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        sizes.add(_resolution(merged.pop("resolution", None), where))
        batches.add(merged.pop("batch_size", None))
        merged.setdefault("caption_extension", KOHYA_CAPTION_EXTENSION)
        merged.setdefault("flip_aug", False)  # kohya's default (our --random_flip is on)
        for s, values in enumerate(inner, 1):
            subsets.append(Subset.from_dict({**merged, **values}, f"{where} subset #{s}"))
    for name, found in (("resolution", sizes), ("batch_size", batches)):
        if len(found) > 1:
            raise DatasetConfigError(
                f"{path}: the datasets have different {name}s {sorted(found, key=str)}; one run "
                f"trains at one {name} here: set it in [general], or train them as separate runs"
            )
    return DatasetConfig(tuple(subsets), sizes.pop(), batches.pop())


def caption_settings(entries: list[dict]) -> list[dict]:
    """The caption keys of data.subsets entries: what the validated items depend on."""
    return [{k: v for k, v in e.items() if k in CAPTION_KEYS} for e in entries]


def subsets_from_list(entries: list[dict], where: str = "data.subsets") -> tuple[Subset, ...]:
    """The pipeline's data.subsets entries (the same keys as a kohya subset)."""
    return tuple(Subset.from_dict(dict(e), f"{where}[{i}]") for i, e in enumerate(entries))


def _resolution(value: object, where: str) -> int | None:
    """kohya's resolution: N or [W, H]; one square bucket area here."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 64:
        raise DatasetConfigError(
            f"{where}: resolution must be a multiple of 64 (or [N, N]), got {value!r}; "
            "buckets here have the area of a square of that side"
        )
    return value


def _check_keys(values: object, known: tuple[str, ...], where: str, *, sections: bool = False,
                subset_only: bool = False) -> None:  # fmt: skip
    if not isinstance(values, dict):
        raise DatasetConfigError(f"{where}: expected a table of keys")
    for key in values:
        if key in known:
            if subset_only and key in ("image_dir", "class_tokens", "is_reg"):
                raise DatasetConfigError(f"{where}: {key} belongs in a [[datasets.subsets]]")
            continue
        if key in KOHYA_UNSUPPORTED:
            raise DatasetConfigError(
                f"{where}: {key} is a kohya option this trainer does not support; remove it"
            )
        if sections:
            raise DatasetConfigError(f"{where}: unknown section {key!r}; use [general] and "
                                     "[[datasets]] with [[datasets.subsets]]")  # fmt: skip
        message = config_fields.unknown_keys_message([key], known, "key")
        raise DatasetConfigError(f"{where}: {message}")


def _typed(obj: Subset, key: str, kind: type, *, minimum: int | None = None,
           optional: bool = False) -> None:  # fmt: skip
    value = getattr(obj, key)
    if value is None and optional:
        return
    bad = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    if bad or (minimum is not None and value < minimum):
        need = f"an integer >= {minimum}" if kind is int else kind.__name__
        raise ValueError(f"{key} must be {need}, got {value!r}")


@dataclass(frozen=True)
class SubsetPlan:
    """How training visits one subset's items, every setting decided."""

    num_repeats: int
    is_reg: bool
    flip: bool
    caption_dropout_rate: float
    shuffle_caption: bool
    keep_tokens: int


def plan_subsets(subsets: Sequence[Subset], *, random_flip: bool, caption_dropout: float,
                 shuffle_caption: bool = False, keep_tokens: int = 0) -> list[SubsetPlan]:  # fmt: skip
    """Each subset's plan, its unset settings taken from the run's (kohya: from the CLI)."""

    def pick(value, default):
        return default if value is None else value

    return [SubsetPlan(s.num_repeats, s.is_reg, pick(s.flip_aug, random_flip),
                       float(pick(s.caption_dropout_rate, caption_dropout)),
                       pick(s.shuffle_caption, shuffle_caption), pick(s.keep_tokens, keep_tokens))
            for s in subsets]  # fmt: skip


def validate_subsets(subsets: Sequence[Subset], **options):
    """validate_dataset of every subset folder (with its caption rules), as one result.

    Item keys and problem files get the subset's index / folder in front, so two folders may
    hold the same file names; `options` are validate_dataset's.
    """
    from sdxl.data.dataset import ValidationResult, validate_dataset

    items, problems = [], []
    for k, subset in enumerate(subsets):
        result = validate_dataset(subset.image_dir, captions=subset.captions, **options)
        items += [replace(it, key=f"{k}/{it.key}", subset=k) for it in result.items]
        problems += [replace(p, file=f"{subset.image_dir}/{p.file}") for p in result.problems]
    folders = ", ".join(s.image_dir for s in subsets)
    return ValidationResult(folders, tuple(items), tuple(problems))


def validate_data(data_dir: str, subsets: Sequence[Subset], **options):
    """The run's data: its subsets when it has some (kohya's datasets replace the folder), else
    the one folder; `options` are validate_dataset's."""
    from sdxl.data.dataset import validate_dataset

    return (
        validate_subsets(subsets, **options) if subsets else validate_dataset(data_dir, **options)
    )


def subset_files(subsets: Sequence[Subset]) -> dict[str, Path]:
    """{'<k>/<relative path>': file} of every image and caption file of every subset."""
    from sdxl.data.dataset import scan_dataset

    found = {}
    for k, subset in enumerate(subsets):
        images, captions = scan_dataset(subset.image_dir, subset.caption_extension)
        found.update({f"{k}/{rel.as_posix()}": Path(subset.image_dir) / rel
                      for rel in images + captions})  # fmt: skip
    return found
