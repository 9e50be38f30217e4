"""The text cache: every caption encoded once by both text encoders, shard by shard, resumably.

Per item key K it holds `K.prompt_embeds` (77, D1+D2) and `K.pooled` (P,), plus
`empty.safetensors` with the embeddings of "" for caption dropout (folder layout:
sdxl.data.shards).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl.data.dataset import Item, read_manifest
from sdxl.data.shards import (
    EMPTY,
    VERSION,
    collect_shards,
    indexed_items,
    item_key,
    release_memory,
    shard_is_done,
    shard_name,
    write_index,
    write_shard,
)
from sdxl.models.clip import CLIPTextModel
from sdxl.progress import Progress
from sdxl.sharding import shard_ranges
from sdxl.text import encode_prompts, load_tokenizers
from sdxl.utils import atomic_path, to_dtype
from sdxl.weights import load_component

TEXT_ITEMS_PER_SHARD = 256


def _load_text_encoders(model_dir, device, dtype):
    encoders = tuple(
        load_component(model_dir, name, model_cls=CLIPTextModel, dtype=dtype, device=device)
        for name in ("text_encoder", "text_encoder_2")
    )
    return load_tokenizers(model_dir), encoders


@torch.no_grad()
def _encode_texts(tokenizers, encoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
    ranges = shard_ranges(len(items), items_per_shard=items_per_shard)
    tokenizers, encoders = _load_text_encoders(model_dir, device, to_dtype(dtype))
    with Progress(len(items), "text", "caption", disable=not progress) as bar:
        for shard, indices in enumerate(ranges):
            expected = _text_shard_expectation(shard, len(ranges), indices, items)
            if shard_is_done(out_dir, shard, expected):
                bar.update(len(indices))
                continue
            tensors = _encode_text_shard(tokenizers, encoders, indices, items, batch_size, bar)
            write_shard(out_dir, shard, tensors, expected)
    embeds, pooled = _encode_texts(tokenizers, encoders, [""])  # (1, 77, D), (1, P)
    empty = {"prompt_embeds": embeds[0].contiguous(), "pooled": pooled[0].contiguous()}
    with atomic_path(out_dir / EMPTY) as tmp:
        save_file(empty, str(tmp), metadata={"format": "pt"})
    merge_text_index(out_dir, len(ranges), shapes=(embeds.shape[1:], pooled.shape[1:]))
    del encoders
    release_memory(device)
    return out_dir


def build_text_cache_from_manifest(
    manifest_path: str | os.PathLike, model_dir, out_dir, **kwargs
) -> Path:
    """build_text_cache on the items of a manifest written by write_manifest."""
    return build_text_cache(read_manifest(manifest_path), model_dir, out_dir, **kwargs)


def merge_text_index(out_dir: str | os.PathLike, num_shards: int, *, shapes) -> Path:
    """Write the text cache's index.json from its shards' json files."""
    out_dir = Path(out_dir)
    metas = collect_shards(out_dir, num_shards, "text")
    with safe_open(str(out_dir / EMPTY), framework="pt") as f:
        dtype = str(f.get_slice("pooled").get_dtype())
    items = indexed_items(metas)
    return write_index(out_dir, {
        "version": VERSION,
        "kind": "text",
        "dtype": dtype,
        "shapes": {"prompt_embeds": list(shapes[0]), "pooled": list(shapes[1])},
        "empty": EMPTY,
        "shards": [shard_name(k) for k in range(num_shards)],
        "count": len(items),
        "items": items,
    })  # fmt: skip
