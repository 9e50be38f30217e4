"""Training caches: VAE latents and text embeddings, computed once, read lazily by the trainer.

Both caches are folders of shards, `shard-00000.safetensors` + `shard-00000.json`, written
atomically (json last, so a shard with its json is complete), plus an `index.json`:

- latents: per sample key K, `K.mean` and `K.std` (fp32, (4, H/8, W/8) at the item's bucket),
  both already multiplied by the VAE scaling factor, so a training latent is
  `mean + std * noise`. With `flip=True` every item also has a mirrored variant `K-flip`.
- text: per item key K, `K.prompt_embeds` (77, D1+D2) and `K.pooled` (P,), plus
  `empty.safetensors` with the embeddings of "" for caption dropout.

Item keys are the zero-padded positions of the items in the list (`000000`, `000001`, ...),
so both caches built from the same item list agree. The trainer loads only these files.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from sdxl.data.buckets import Bucket, assign_bucket, make_buckets
from sdxl.data.dataset import Item, load_image, read_manifest
from sdxl.data.transforms import MicroConditioning, transform_image
from sdxl.utils import atomic_path, atomic_write_text, to_dtype

log = logging.getLogger(__name__)

VERSION = 1
INDEX = "index.json"
EMPTY = "empty.safetensors"
FLIP_SUFFIX = "-flip"
TEXT_ITEMS_PER_SHARD = 256


class CacheError(ValueError):
    """A cache folder is missing, incomplete or inconsistent; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Shared helpers: keys, shard plans, shard files


def item_key(index: int) -> str:
    """The cache key of the item at `index` in the item list."""
    return f"{index:06d}"


def shard_name(shard: int) -> str:
    """File stem of shard number `shard`."""
    return f"shard-{shard:05d}"


def shard_ranges(n: int, num_shards: int) -> list[range]:
    """Split item positions 0..n-1 into `num_shards` contiguous, near-equal ranges."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [range(k * n // num_shards, (k + 1) * n // num_shards) for k in range(num_shards)]


def _chunk_ranges(n: int, items_per_shard: int) -> list[range]:
    """Ranges of `items_per_shard` positions (the last may be shorter; at least one range)."""
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    count = max(1, math.ceil(n / items_per_shard))
    return [range(k * items_per_shard, min(n, (k + 1) * items_per_shard)) for k in range(count)]


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable (an interrupted write)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _shard_is_done(out_dir: Path, shard: int, expected: dict[str, Any]) -> bool:
    """True if the shard's pair exists and its json matches `expected` (same items, settings)."""
    stem = shard_name(shard)
    meta = _read_json(out_dir / f"{stem}.json")
    if meta is None or not (out_dir / f"{stem}.safetensors").is_file():
        return False
    if all(meta.get(k) == v for k, v in expected.items()):
        return True
    log.warning("%s/%s was built from other items or settings; rebuilding it", out_dir, stem)
    return False


def _write_shard(out_dir: Path, shard: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the shard's tensors, then its json (last: the json marks the shard complete)."""
    stem = shard_name(shard)
    (out_dir / f"{stem}.json").unlink(missing_ok=True)  # a stale json must never vouch for new data
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(out_dir / f"{stem}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(meta, indent=1, ensure_ascii=False))


def _release_memory(device: str | torch.device) -> None:
    """Give a deleted model's GPU memory back, so the next stage (training) starts clean."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Latent cache


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
        "image_size": image_size,
        "crop": "random" if random_crop else "center",
        "flip": flip,
        "seed": seed,
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
    bar = tqdm(total=total, desc="latents", unit="img", disable=not opts["progress"])
    for bucket, batch in _bucket_batches(indices, items, buckets, opts["batch_size"]):
        samples = [
            (i, px, cond)
            for i in batch
            for px, cond in _transform_variants(i, items[i], bucket, **crop)
        ]
        mean, std = _encode_batch(vae, [s[1] for s in samples], opts["device"], opts["dtype"])
        for (i, _, cond), m, sd in zip(samples, mean, std, strict=True):
            key = _sample_key(i, cond.flipped)
            tensors[f"{key}.mean"], tensors[f"{key}.std"] = m, sd
            records[key] = _sample_record(i, items[i], bucket, cond)
        bar.update(len(samples))
    bar.close()
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


def _vae_folder(model_dir, vae_dir) -> Path:
    """The folder with the VAE's config.json and weights: vae_dir (or its vae/) or model/vae."""
    if vae_dir is None:
        return Path(model_dir) / "vae"
    vae_dir = Path(vae_dir)
    return vae_dir / "vae" if (vae_dir / "vae" / "config.json").is_file() else vae_dir


def _load_vae(model_dir, vae_dir, device, dtype):
    """The model's VAE, or a separate one (e.g. sdxl-vae-fp16-fix), frozen in eval mode."""
    from sdxl import weights

    if vae_dir is None:
        return weights.load_component(model_dir, "vae", dtype=dtype, device=device)
    folder = _vae_folder(model_dir, vae_dir)
    model = weights.build_on_meta("vae", _vae_config(folder), str(folder / "config.json"))
    sd = weights.load_component_state_dict(folder, device=device, dtype=dtype)
    return weights.assign_state_dict(model, sd, str(folder), "vae")


def _vae_config(folder: Path) -> dict:
    """The VAE's config.json, or a CacheError saying what the folder must hold."""
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CacheError(
            f"cannot read {folder / 'config.json'}; pass an SDXL model folder (with vae/) or a "
            "VAE folder holding config.json and diffusion_pytorch_model.safetensors"
        )
    return config


def _scaling_factor(model_dir, vae_dir) -> float:
    """The VAE's latent scaling factor, read from its config without loading the weights."""
    from sdxl.models.vae import VAEConfig

    config = _vae_config(_vae_folder(model_dir, vae_dir))
    return float(config.get("scaling_factor", VAEConfig.scaling_factor))


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
    scaling = _scaling_factor(model_dir, vae_dir)
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
        ranges = _chunk_ranges(n, items_per_shard)
        return ranges, list(range(len(ranges)))
    ranges = shard_ranges(n, num_shards)
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
        if _shard_is_done(out_dir, shard, expected):
            log.info("%s/%s is complete; skipping it", out_dir, shard_name(shard))
            continue
        if vae is None:
            vae = _load_vae(model_dir, opts["vae_dir"], opts["device"], opts["dtype"])
        tensors, records = _encode_shard(vae, ranges[shard], items, buckets, opts)
        _write_shard(out_dir, shard, tensors, {**expected, "items": records})
    del vae
    _release_memory(opts["device"])


def build_latent_cache_from_manifest(
    manifest_path: str | os.PathLike, model_dir, out_dir, **kwargs
) -> Path:
    """build_latent_cache on the items of a manifest written by write_manifest."""
    return build_latent_cache(read_manifest(manifest_path), model_dir, out_dir, **kwargs)


def _collect_shards(out_dir: Path, num_shards: int, kind: str) -> list[dict]:
    """The json of every shard, or a CacheError naming the missing ones."""
    metas = [_read_json(out_dir / f"{shard_name(k)}.json") for k in range(num_shards)]
    missing = [
        shard_name(k)
        for k, meta in enumerate(metas)
        if meta is None or not (out_dir / f"{shard_name(k)}.safetensors").is_file()
    ]
    if missing:
        raise CacheError(
            f"{kind} cache {out_dir} is incomplete: missing {', '.join(missing)}; build those "
            f"shards first (rerun the cache step with the same settings)"
        )
    for k, meta in enumerate(metas):
        if meta.get("kind") != kind or meta.get("num_shards") != num_shards:
            raise CacheError(
                f"{out_dir}/{shard_name(k)}.json belongs to another {kind} cache layout "
                f"(expected {num_shards} shards); delete {out_dir} and rebuild the cache"
            )
    return metas


def merge_latent_index(out_dir: str | os.PathLike, num_shards: int) -> Path:
    """Write index.json from the shards' json files, checking they were built alike."""
    out_dir = Path(out_dir)
    metas = _collect_shards(out_dir, num_shards, "latents")
    settings = metas[0]["settings"]
    for k, meta in enumerate(metas):
        if meta["settings"] != settings:
            raise CacheError(
                f"{out_dir}: {shard_name(k)} was built with {meta['settings']}, "
                f"{shard_name(0)} with {settings}; delete {out_dir} and rebuild the cache"
            )
    items = [
        {**record, "shard": shard_name(k)}
        for k, meta in enumerate(metas)
        for record in meta["items"]
    ]
    index = {
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
    }
    path = out_dir / INDEX
    atomic_write_text(path, json.dumps(index, indent=1, ensure_ascii=False))
    return path


# ---------------------------------------------------------------------------------------------
# Text cache


def _load_text_encoders(model_dir, device, dtype):
    from sdxl.text import load_tokenizers
    from sdxl.weights import load_component

    encoders = tuple(
        load_component(model_dir, name, dtype=dtype, device=device).eval().requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2")
    )
    return load_tokenizers(model_dir), encoders


@torch.no_grad()
def _encode_texts(tokenizers, encoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from sdxl.text import encode_prompts

    prompt_embeds, pooled = encode_prompts(tokenizers, encoders, captions)
    return prompt_embeds.cpu(), pooled.cpu()  # (B, 77, D1+D2), (B, P)


def _text_shard_expectation(shard: int, num_shards: int, indices: range, items) -> dict:
    return {
        "version": VERSION,
        "kind": "text",
        "shard": shard,
        "num_shards": num_shards,
        "items": [
            {"key": item_key(i), "source": items[i].key, "caption": items[i].caption}
            for i in indices
        ],
    }


def _encode_text_shard(tokenizers, encoders, indices: range, items, batch_size, bar) -> dict:
    """prompt_embeds and pooled of every item in one shard."""
    tensors = {}
    positions = list(indices)
    for start in range(0, len(positions), batch_size):
        batch = positions[start : start + batch_size]
        embeds, pooled = _encode_texts(tokenizers, encoders, [items[i].caption for i in batch])
        for i, e, p in zip(batch, embeds, pooled, strict=True):
            tensors[f"{item_key(i)}.prompt_embeds"], tensors[f"{item_key(i)}.pooled"] = e, p
        bar.update(len(batch))
    return tensors


def build_text_cache(
    items: Sequence[Item],
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    items_per_shard: int = TEXT_ITEMS_PER_SHARD,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    progress: bool = True,
) -> Path:
    """Encode every caption (and "") with both text encoders; resumable per shard. Returns out_dir."""
    if not items:
        raise ValueError("no items to cache")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    ranges = _chunk_ranges(len(items), items_per_shard)
    tokenizers, encoders = _load_text_encoders(model_dir, device, to_dtype(dtype))
    bar = tqdm(total=len(items), desc="text", unit="caption", disable=not progress)
    for shard, indices in enumerate(ranges):
        expected = _text_shard_expectation(shard, len(ranges), indices, items)
        if _shard_is_done(out_dir, shard, expected):
            bar.update(len(indices))
            continue
        tensors = _encode_text_shard(tokenizers, encoders, indices, items, batch_size, bar)
        _write_shard(out_dir, shard, tensors, expected)
    bar.close()
    embeds, pooled = _encode_texts(tokenizers, encoders, [""])  # (1, 77, D), (1, P)
    empty = {"prompt_embeds": embeds[0].contiguous(), "pooled": pooled[0].contiguous()}
    with atomic_path(out_dir / EMPTY) as tmp:
        save_file(empty, str(tmp), metadata={"format": "pt"})
    merge_text_index(out_dir, len(ranges), shapes=(embeds.shape[1:], pooled.shape[1:]))
    del encoders
    _release_memory(device)
    return out_dir


def build_text_cache_from_manifest(
    manifest_path: str | os.PathLike, model_dir, out_dir, **kwargs
) -> Path:
    """build_text_cache on the items of a manifest written by write_manifest."""
    return build_text_cache(read_manifest(manifest_path), model_dir, out_dir, **kwargs)


def merge_text_index(out_dir: str | os.PathLike, num_shards: int, *, shapes) -> Path:
    """Write the text cache's index.json from its shards' json files."""
    out_dir = Path(out_dir)
    metas = _collect_shards(out_dir, num_shards, "text")
    with safe_open(str(out_dir / EMPTY), framework="pt") as f:
        dtype = str(f.get_slice("pooled").get_dtype())
    items = [
        {**record, "shard": shard_name(k)}
        for k, meta in enumerate(metas)
        for record in meta["items"]
    ]
    index = {
        "version": VERSION,
        "kind": "text",
        "dtype": dtype,
        "shapes": {"prompt_embeds": list(shapes[0]), "pooled": list(shapes[1])},
        "empty": EMPTY,
        "shards": [shard_name(k) for k in range(num_shards)],
        "count": len(items),
        "items": items,
    }
    path = out_dir / INDEX
    atomic_write_text(path, json.dumps(index, indent=1, ensure_ascii=False))
    return path


# ---------------------------------------------------------------------------------------------
# Reader


def is_cache_dir(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True if `path` holds a finished cache (of `kind` 'latents' or 'text', if given)."""
    index = _read_json(Path(path) / INDEX)
    if not isinstance(index, dict) or index.get("version") != VERSION:
        return False
    return index.get("kind") in (("latents", "text") if kind is None else (kind,))


def _read_index(folder: Path, kind: str) -> dict:
    """A cache's index.json, checked; a CacheError naming the folder and the fix otherwise."""
    step = "build_latent_cache / merge_latent_index" if kind == "latents" else "build_text_cache"
    index = _read_json(folder / INDEX)
    if index is None:
        raise CacheError(
            f"{kind} cache {folder} has no readable {INDEX}: it is missing, unfinished or not a "
            f"cache folder; run {step} for it (or the cache rule of the workflow)"
        )
    if index.get("kind") != kind or index.get("version") != VERSION:
        raise CacheError(
            f"{folder}/{INDEX} is not a version-{VERSION} {kind} cache "
            f"(kind={index.get('kind')!r}, version={index.get('version')!r}); rebuild it with {step}"
        )
    files = [f"{s}.safetensors" for s in index["shards"]] + ([EMPTY] if kind == "text" else [])
    missing = [f for f in files if not (folder / f).is_file()]
    if missing or index["count"] != len(index["items"]):
        raise CacheError(
            f"{kind} cache {folder} is incomplete (missing {', '.join(missing) or 'items'}); "
            f"rebuild it with {step}"
        )
    return index


def _check_agreement(latent_dir: Path, text_dir: Path, latents: dict, texts: dict) -> None:
    """Every latent sample must find its own item (same file, same caption) in the text cache."""
    by_key = {t["key"]: (t["source"], t["caption"]) for t in texts["items"]}
    for record in latents["items"]:
        found = by_key.get(record["item"])
        if found != (record["source"], record["caption"]):
            raise CacheError(
                f"text cache {text_dir} and latent cache {latent_dir} disagree on item "
                f"{record['item']}: latents have {record['source']} {record['caption']!r}, "
                f"text has {found or 'no such item'}; build both caches from the same "
                "items (manifest)"
            )


class CachedDataset(torch.utils.data.Dataset):
    """Training samples from a latent cache and a text cache; tensors are read lazily."""

    def __init__(self, latent_dir: str | os.PathLike, text_dir: str | os.PathLike):
        self.latent_dir, self.text_dir = Path(latent_dir), Path(text_dir)
        latents = _read_index(self.latent_dir, "latents")
        texts = _read_index(self.text_dir, "text")
        _check_agreement(self.latent_dir, self.text_dir, latents, texts)
        self.samples: list[dict] = latents["items"]
        self.scaling_factor: float = latents["scaling_factor"]
        self.settings: dict = latents["settings"]
        self._text_shard = {t["key"]: t["shard"] for t in texts["items"]}
        self._handles: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        """Pickle without the open file handles (DataLoader workers reopen them)."""
        return {**self.__dict__, "_handles": {}}

    def _file(self, path: Path):
        """A safe_open handle per shard file, opened on first use and kept."""
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def buckets(self) -> dict[Bucket, list[int]]:
        """Sample indices grouped by bucket (W, H)."""
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for i, record in enumerate(self.samples):
            groups[tuple(record["bucket"])].append(i)
        return dict(groups)

    def variants(self) -> dict[str, list[int]]:
        """Sample indices grouped by source item (the unflipped sample first)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(self.samples):
            groups[record["item"]].append(i)
        return dict(groups)

    def is_flipped(self, i: int) -> bool:
        """Whether sample i is a mirrored variant."""
        return self.samples[i]["flipped"]

    def subset(self, i: int) -> int:
        """The data subset (sdxl.dataset_config) sample i belongs to; 0 for one folder."""
        return self.samples[i].get("subset", 0)

    def source(self, i: int) -> str:
        """The image (relative to the data folder) sample i was made from; shared by variants."""
        return self.samples[i]["source"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.samples[i]
        key, item = record["key"], record["item"]
        latents = self._file(self.latent_dir / f"{record['shard']}.safetensors")
        text = self._file(self.text_dir / f"{self._text_shard[item]}.safetensors")
        time_ids = [*record["original_size"], *record["crop_top_left"], *record["target_size"]]
        return {
            "mean": latents.get_tensor(f"{key}.mean"),  # (4, h, w), scaled
            "std": latents.get_tensor(f"{key}.std"),  # (4, h, w), scaled
            "prompt_embeds": text.get_tensor(f"{item}.prompt_embeds"),  # (77, D)
            "pooled": text.get_tensor(f"{item}.pooled"),  # (P,)
            "time_ids": torch.tensor(time_ids, dtype=torch.float32),  # (6,)
            "key": key,
            "item": item,
            "caption": record["caption"],
            "bucket": tuple(record["bucket"]),
            "flipped": record["flipped"],
        }

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (77, D), pooled (P,)) of the empty caption, for caption dropout."""
        f = self._file(self.text_dir / EMPTY)
        return f.get_tensor("prompt_embeds"), f.get_tensor("pooled")
