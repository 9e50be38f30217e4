"""Feature extraction over image files, saved per shard (safetensors) and merged.

A feature file holds `inception` (N, D) pool features and, when prompts are known and a CLIP
model is asked for, `clip_image` / `clip_text` (N, E) projected embeddings; its metadata name
the models and the image count, so a merge can refuse files made with other models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl.errors import UserError
from sdxl.evaluate.clip import DEFAULT_CLIP, image_embeddings, load_clip, text_embeddings
from sdxl.evaluate.files import IMAGE_EXTENSIONS, image_paths
from sdxl.evaluate.inception import DEFAULT_INCEPTION, load_inception, resize_299
from sdxl.generate.png_meta import recorded_meta
from sdxl.progress import track
from sdxl.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    inception: str = DEFAULT_INCEPTION  # "default" (FID weights), builtin:tiny-inception, a path
    clip_model: str | None = DEFAULT_CLIP  # Hub id, folder, builtin:tiny-clip; None: no CLIP
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def image_files(folder: str | Path) -> list[Path]:
    """Every image under `folder` (recursively, sorted); UserError if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    files = image_paths(folder)
    if not files:
        raise UserError(f"{folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def dataset_items(folder: str | Path) -> tuple[list[Path], list[str] | None]:
    """A generated dataset's images and prompts: from its captions.json (COCO) if it has one,
    else each image's .txt caption or recorded prompt. Prompts are None if any is unknown."""
    folder = Path(folder)
    captions = folder / "captions.json"
    if captions.is_file():
        coco = json.loads(captions.read_text(encoding="utf-8"))
        by_id = {a["image_id"]: a["caption"] for a in coco.get("annotations", [])}
        files = [folder / im["file_name"] for im in coco["images"]]
        prompts = [by_id.get(im["id"]) for im in coco["images"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{captions}: lists {missing[0]}, which does not exist ({len(missing)} missing)")  # fmt: skip
    else:
        files = image_files(folder)
        prompts = [recorded_prompt(f) for f in files]
    return files, (None if None in prompts else prompts)


def recorded_prompt(path: Path) -> str | None:
    """The prompt of an image: its .txt sidecar, else the one recorded in the PNG."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    text = recorded_meta(path)
    return json.loads(text).get("prompt") if text else None


def read_uint8(path: Path) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read the image ({err}); remove or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def extract_features(files: list[Path], prompts: list[str] | None, cfg: FeatureConfig,
                     desc: str = "features") -> dict[str, torch.Tensor]:  # fmt: skip
    """Inception features (and CLIP embeddings when prompts are given) of `files`, in order."""
    if prompts is not None and len(prompts) != len(files):
        raise ValueError(f"{len(files)} images but {len(prompts)} prompts")
    inception = load_inception(cfg.inception, cfg.device)
    clip = load_clip(cfg.clip_model, cfg.device) if cfg.clip_model and prompts else None
    out: dict[str, list[torch.Tensor]] = {"inception": [], "clip_image": [], "clip_text": []}
    for start in track(range(0, len(files), cfg.batch_size), desc, "batch"):
        images = [read_uint8(f) for f in files[start : start + cfg.batch_size]]
        out["inception"].append(_inception_batch(inception, images, cfg.device))
        if clip is not None:
            out["clip_image"].append(image_embeddings(*clip, images).cpu())
            batch_prompts = prompts[start : start + cfg.batch_size]
            out["clip_text"].append(text_embeddings(*clip, batch_prompts).cpu())
    result = {k: torch.cat(v) for k, v in out.items() if v}
    result.setdefault("inception", torch.empty(0, inception.num_features))  # an empty shard
    return result


@torch.inference_mode()
def _inception_batch(model, images: list[torch.Tensor], device) -> torch.Tensor:
    # Resized one by one (sizes may differ); the same arithmetic as resizing the batch.
    dtype = model.fc.weight.dtype
    x = torch.cat([resize_299(im[None].to(device, dtype), model.config.resize) for im in images])
    return model.features(x).cpu()  # (B, D)


def feature_metadata(cfg: FeatureConfig, n: int, source: str) -> dict[str, str]:
    return {"n_images": str(n), "inception": cfg.inception, "clip_model": cfg.clip_model or "",
            "source": source}  # fmt: skip


def save_features(
    path: str | Path, features: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """One feature file, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in features.items()}, str(tmp), metadata=meta)


def load_features(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return tensors, dict(f.metadata() or {})


def merge_features(paths: list[str | Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Concatenate shard files in the order given; they must share models and tensors."""
    if not paths:
        raise ValueError("no feature files to merge")
    loaded = [load_features(p) for p in paths]
    first_meta, first = loaded[0][1], loaded[0][0]
    for path, (tensors, meta) in zip(paths, loaded, strict=True):
        for key in ("inception", "clip_model"):
            if meta.get(key) != first_meta.get(key):
                raise UserError(f"{path}: made with {key} {meta.get(key)!r}, not "
                                f"{first_meta.get(key)!r} as {paths[0]}; rerun its extraction")  # fmt: skip
        if tensors.keys() != first.keys():
            raise UserError(f"{path}: holds {sorted(tensors)}, {paths[0]} {sorted(first)}")
    merged = {k: torch.cat([t[k] for t, _ in loaded]) for k in first}
    n = sum(int(m["n_images"]) for _, m in loaded)
    return merged, first_meta | {"n_images": str(n)}
