"""Evaluate a generated dataset: features of both sides -> metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl.errors import UserError
from sdxl.evaluate.features import (
    FeatureConfig,
    dataset_items,
    extract_features,
    feature_metadata,
    image_files,
    merge_features,
    recorded_prompt,
    save_features,
)
from sdxl.evaluate.inception import TINY_INCEPTION, WEIGHTS_FILE
from sdxl.evaluate.metrics import clip_score, fid, kid, write_metrics

CONVENTIONS = ("torchmetrics FrechetInceptionDistance / KernelInceptionDistance / CLIPScore; "
               "torch-fidelity InceptionV3 pool features, TF1 bilinear resize to 299")  # fmt: skip


def compute_metrics(fake: dict[str, torch.Tensor], fake_meta: dict, real: dict[str, torch.Tensor],
                    real_meta: dict, kid_subsets: int = 100,
                    kid_subset_size: int = 1000) -> dict:  # fmt: skip
    """metrics.json's content from the generated (`fake`) and reference (`real`) features."""
    if fake_meta["inception"] != real_meta["inception"]:
        raise ValueError(f"generated features use inception {fake_meta['inception']!r}, the "
                         f"reference's {real_meta['inception']!r}: extract both with one model")  # fmt: skip
    kid_mean, kid_std, size = kid(
        real["inception"], fake["inception"], kid_subsets, kid_subset_size
    )
    has_clip = "clip_image" in fake
    name = fake_meta["inception"]
    return {
        "n_images": int(fake_meta["n_images"]),
        "images": fake_meta["source"],
        "reference": {"source": real_meta["source"], "n_images": int(real_meta["n_images"])},
        "inception": {
            "model": name,
            "features": fake["inception"].shape[1],
            "weights": "random (tiny test model)" if name == TINY_INCEPTION else WEIGHTS_FILE,
        },  # fmt: skip
        "clip_model": fake_meta["clip_model"] if has_clip else None,
        "fid": fid(real["inception"], fake["inception"]),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": kid_subsets,
        "kid_subset_size": size,
        "clip_score": clip_score(fake["clip_image"], fake["clip_text"]) if has_clip else None,
        "conventions": CONVENTIONS,
    }


def evaluate_folders(images: str | Path, reference: str | Path, cfg: FeatureConfig,
                     output: str | Path, kid_subsets: int = 100,
                     kid_subset_size: int = 1000) -> dict:  # fmt: skip
    """Features of a generated dataset and a reference image folder, then metrics.json."""
    files, prompts = dataset_items(images)
    ref_files = image_files(reference)  # both folders checked before the long work
    fake = extract_features(files, prompts, cfg, desc="generated")
    real = extract_features(ref_files, None, cfg, desc="reference")
    metrics = compute_metrics(fake, feature_metadata(cfg, len(files), str(images)), real,
                              feature_metadata(cfg, len(ref_files), str(reference)),
                              kid_subsets, kid_subset_size)  # fmt: skip
    write_metrics(output, metrics)
    return metrics


def marker_items(marker: str | Path) -> tuple[list[Path], list[str]]:
    """The images of a generate shard (its shard-K.json) and their recorded prompts."""
    m = json.loads(Path(marker).read_text(encoding="utf-8"))
    files = [Path(m["folder"]) / name for name in m["files"]]
    prompts = [recorded_prompt(f) for f in files]
    if None in prompts:
        raise UserError(f"{files[prompts.index(None)]}: no prompt recorded beside or in it; "
                        "rerun its generate job")  # fmt: skip
    return files, prompts


def reference_items(reference_dir: str | None, manifest: str | Path) -> list[Path]:
    """The reference images: every image under reference_dir, else the training items."""
    if reference_dir:
        return image_files(reference_dir)
    from sdxl.data.dataset import read_manifest

    return [Path(item.path) for item in read_manifest(manifest)]


def extract_shard(files: list[Path], prompts: list[str] | None, cfg: FeatureConfig,
                  out: str | Path, source: str) -> None:  # fmt: skip
    """One feature job: the features of `files` into the safetensors file `out`."""
    features = extract_features(files, prompts, cfg, desc=source)
    save_features(out, features, feature_metadata(cfg, len(files), source))


def evaluate_shards(generated: list[str | Path], reference: list[str | Path], out: str | Path,
                    kid_subsets: int, kid_subset_size: int, images: str) -> dict:  # fmt: skip
    """The merge job: shard feature files of both sides -> metrics.json (`images`: what the
    generated side is called there)."""
    fake, fake_meta = merge_features(generated)
    real, real_meta = merge_features(reference)
    fake_meta |= {"source": images}
    metrics = compute_metrics(fake, fake_meta, real, real_meta, kid_subsets, kid_subset_size)
    write_metrics(out, metrics)
    return metrics
