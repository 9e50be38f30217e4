"""The latent cache: every item's image encoded once by the VAE, shard by shard, resumably.

Per sample key K it holds `K.mean` and `K.std` (fp32, (4, H/8, W/8) at the item's bucket),
both already multiplied by the VAE scaling factor, so a training latent is `mean + std * noise`.
With `flip=True` every item also has a mirrored variant `K-flip`. index.json records the
settings the latents were made with (folder layout: sdxl.data.shards).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdxl.data.buckets import Bucket, assign_bucket, make_buckets
from sdxl.data.dataset import Item, load_image, read_manifest
from sdxl.data.shards import (
    VERSION,
    CacheError,
    collect_shards,
    indexed_items,
    item_key,
    release_memory,
    shard_is_done,
    shard_name,
    write_index,
    write_shard,
)
from sdxl.data.transforms import MicroConditioning, transform_image
from sdxl.models.vae import AutoencoderKL
from sdxl.progress import Progress
from sdxl.sharding import shard_ranges
from sdxl.utils import to_dtype
from sdxl.weights import load_vae, vae_scaling_factor

log = logging.getLogger(__name__)

FLIP_SUFFIX = "-flip"


def sample_settings(image_size: int, random_crop: bool, flip: bool, seed: int) -> dict[str, Any]:
    """How the images become samples: the bucket size, the crop, the flips and the crop seed."""
    return {
        "image_size": image_size,
        "crop": "random" if random_crop else "center",
        "flip": flip,
        "seed": seed,
    }


def latent_settings(
    image_size: int,
    random_crop: bool,
    flip: bool,
    seed: int,
    scaling_factor: float,
    vae: str | None = None,
) -> dict[str, Any]:
    """What decides the cached latents besides the items and the model's weights."""
    return {
        **sample_settings(image_size, random_crop, flip, seed),
        "scaling_factor": scaling_factor,
        "vae": vae,  # a separate VAE folder, or None for the model's own
    }


def _variants(flip: bool) -> tuple[bool, ...]:
    return (False, True) if flip else (False,)


def _sample_key(index: int, flipped: bool) -> str:
    return item_key(index) + (FLIP_SUFFIX if flipped else "")


def _sample_record(
    index: int, item: Item, bucket: Bucket, cond: MicroConditioning
) -> dict[str, Any]:
    """The json entry of one cached sample."""
    return {
        "key": _sample_key(index, cond.flipped),
        "item": item_key(index),
        "source": item.key,
        "caption": item.caption,
        "subset": item.subset,
        "bucket": list(bucket),
        "original_size": list(cond.original_size),
        "crop_top_left": list(cond.crop_top_left),
        "target_size": list(cond.target_size),
        "flipped": cond.flipped,
    }


def _transform_variants(
    index: int, item: Item, bucket: Bucket, *, random_crop: bool, flip: bool, seed: int
) -> list[tuple[torch.Tensor, MicroConditioning]]:
    """The item's image prepared for the VAE, unflipped and (with flip) mirrored.

    One generator per item, seeded with seed + index, so the crops do not depend on the
    batch size, the shard split or the order of work.
    """
    image = load_image(item.path)
    rng = torch.Generator().manual_seed(seed + index)
    return [
        transform_image(image, bucket, random_crop=random_crop, flip_prob=float(f), rng=rng)
        for f in _variants(flip)
    ]


@torch.no_grad()
def _encode_batch(vae, pixels: list[torch.Tensor], device, dtype) -> tuple[torch.Tensor, ...]:
    """Scaled (mean, std) in fp32 for a batch of same-size images."""
    x = torch.stack(pixels).to(device=device, dtype=dtype)  # (B, 3, H, W)
    mean, logvar = vae.encode(x)  # (B, 4, H/8, W/8) each, unscaled
    scale = vae.config.scaling_factor
    std = torch.exp(0.5 * logvar.float())
    return (mean.float() * scale).cpu(), (std * scale).cpu()


def _bucket_batches(
    indices: range, items: Sequence[Item], buckets: list[Bucket], batch_size: int
) -> list[tuple[Bucket, list[int]]]:
    """Item positions grouped by bucket (first-seen order), cut into batches."""
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for i in indices:
        by_bucket[assign_bucket(items[i].width, items[i].height, buckets)].append(i)
    return [
        (bucket, members[start : start + batch_size])
        for bucket, members in by_bucket.items()
        for start in range(0, len(members), batch_size)
    ]


def _encode_shard(
    vae, indices: range, items: Sequence[Item], buckets: list[Bucket], opts: dict
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Encode every sample of one shard, one bucket at a time; records in item order."""
    variants = _variants(opts["flip"])
    crop = {"random_crop": opts["random_crop"], "flip": opts["flip"], "seed": opts["seed"]}
    tensors, records = {}, {}
    total = len(indices) * len(variants)
    with Progress(total, "latents", "image", disable=not opts["progress"]) as bar:
        for bucket, batch in _bucket_batches(indices, items, buckets, opts["batch_size"]):
            samples = [
                (i, px, cond)
                for i in batch
                for px, cond in _transform_variants(i, items[i], bucket, **crop)
            ]
            pixels = [s[1] for s in samples]
            mean, std = _encode_batch(vae, pixels, opts["device"], opts["dtype"])
            for (i, _, cond), m, sd in zip(samples, mean, std, strict=True):
                key = _sample_key(i, cond.flipped)
                tensors[f"{key}.mean"], tensors[f"{key}.std"] = m, sd
                records[key] = _sample_record(i, items[i], bucket, cond)
            bar.update(len(samples))
    return tensors, [records[_sample_key(i, f)] for i in indices for f in variants]


def _latent_shard_expectation(
    shard: int, num_shards: int, indices: range, items: Sequence[Item], settings: dict
) -> dict[str, Any]:
    """The json fields that identify a shard: which items, from which files, how."""
    return {
        "version": VERSION,
        "kind": "latents",
        "shard": shard,
        "num_shards": num_shards,
        "settings": settings,
        "sources": [[item_key(i), items[i].key, items[i].caption] for i in indices],
    }


def build_latent_cache(
    items: Sequence[Item],
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    shard_index: int | None = 0,
    num_shards: int = 1,
    items_per_shard: int | None = None,
    batch_size: int = 4,
    random_crop: bool = False,
    flip: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    progress: bool = True,
    vae_dir: str | os.PathLike | None = None,
) -> Path:
    """Encode the items' images with the VAE into shard `shard_index` of `num_shards`.

    Shards are contiguous parts of `items`; a shard whose pair of files is already complete
    (same items and settings) is skipped, so a killed run resumes. `shard_index=None` builds
    every shard; `items_per_shard` builds every shard, each of that many items (num_shards is
    then derived). When all shards are built here, index.json is written too. `vae_dir` uses a
    separate VAE (a folder with its config.json and weights) instead of model_dir/vae.
    Returns out_dir.
    """
    if not items:
        raise ValueError("no items to cache")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    ranges, todo = _plan_shards(len(items), shard_index, num_shards, items_per_shard)
    opts = {
        "batch_size": batch_size,
        "random_crop": random_crop,
        "flip": flip,
        "seed": seed,
        "device": device,
        "dtype": to_dtype(dtype),
        "progress": progress,
        "vae_dir": vae_dir,
    }
    scaling = vae_scaling_factor(model_dir, vae_dir)
    vae = None if vae_dir is None else str(vae_dir)
    settings = latent_settings(image_size, random_crop, flip, seed, scaling, vae)
    _build_latent_shards(items, model_dir, out_dir, ranges, todo, settings, opts)
    if len(todo) == len(ranges):
        merge_latent_index(out_dir, len(ranges))
    return out_dir


def _plan_shards(
    n: int, shard_index: int | None, num_shards: int, items_per_shard: int | None
) -> tuple[list[range], list[int]]:
    """(item ranges of all shards, the shards this call builds)."""
    if items_per_shard is not None:
        ranges = shard_ranges(n, items_per_shard=items_per_shard)
        return ranges, list(range(len(ranges)))
    ranges = shard_ranges(n, num_shards=num_shards)
    if shard_index is None or num_shards == 1:
        return ranges, list(range(num_shards))
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
    return ranges, [shard_index]


def _build_latent_shards(items, model_dir, out_dir: Path, ranges, todo, settings, opts) -> None:
    """Build the shards in `todo` that are not complete yet; load the VAE only if needed."""
    buckets = make_buckets(settings["image_size"])
    vae = None
    for shard in todo:
        expected = _latent_shard_expectation(shard, len(ranges), ranges[shard], items, settings)
        if shard_is_done(out_dir, shard, expected):
            log.info("%s/%s is complete; skipping it", out_dir, shard_name(shard))
            continue
        if vae is None:
            vae = load_vae(model_dir, opts["vae_dir"], model_cls=AutoencoderKL,
                           device=opts["device"], dtype=opts["dtype"])  # fmt: skip
        tensors, records = _encode_shard(vae, ranges[shard], items, buckets, opts)
        write_shard(out_dir, shard, tensors, {**expected, "items": records})
    del vae
    release_memory(opts["device"])


def build_latent_cache_from_manifest(
    manifest_path: str | os.PathLike, model_dir, out_dir, **kwargs
) -> Path:
    """build_latent_cache on the items of a manifest written by write_manifest."""
    return build_latent_cache(read_manifest(manifest_path), model_dir, out_dir, **kwargs)


def merge_latent_index(out_dir: str | os.PathLike, num_shards: int) -> Path:
    """Write index.json from the shards' json files, checking they were built alike."""
    out_dir = Path(out_dir)
    metas = collect_shards(out_dir, num_shards, "latents")
    settings = metas[0]["settings"]
    for k, meta in enumerate(metas):
        if meta["settings"] != settings:
            raise CacheError(
                f"{out_dir}: {shard_name(k)} was built with {meta['settings']}, "
                f"{shard_name(0)} with {settings}; delete {out_dir} and rebuild the cache"
            )
    items = indexed_items(metas)
    return write_index(out_dir, {
        "version": VERSION,
        "kind": "latents",
        "scaling_factor": settings["scaling_factor"],
        "scaled": True,
        "note": "mean and std are multiplied by scaling_factor; latent = mean + std * noise",
        "image_size": settings["image_size"],
        "settings": settings,
        "shards": [shard_name(k) for k in range(num_shards)],
        "count": len(items),
        "num_items": sum(len(meta["sources"]) for meta in metas),
        "items": items,
    })  # fmt: skip
