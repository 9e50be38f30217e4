"""The layout both training caches share: item keys, shard plans, shard files, index.json.

A cache is a folder of shards, `shard-00000.safetensors` + `shard-00000.json`, written
atomically (json last, so a shard with its json is complete), plus an `index.json` that the
reader (`sdxl.data.cached_dataset`) opens. Item keys are the zero-padded positions of the items
in the list (`000000`, `000001`, ...), so both caches built from the same item list agree.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdxl.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1
INDEX = "index.json"
EMPTY = "empty.safetensors"  # the text cache's embeddings of "" (caption dropout)


class CacheError(ValueError):
    """A cache folder is missing, incomplete or inconsistent; the message says what to do."""


def item_key(index: int) -> str:
    """The cache key of the item at `index` in the item list."""
    return f"{index:06d}"


def shard_name(shard: int) -> str:
    """File stem of shard number `shard`."""
    return f"shard-{shard:05d}"


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable (an interrupted write)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shard_is_done(out_dir: Path, shard: int, expected: dict[str, Any]) -> bool:
    """True if the shard's pair exists and its json matches `expected` (same items, settings)."""
    stem = shard_name(shard)
    meta = read_json(out_dir / f"{stem}.json")
    if meta is None or not (out_dir / f"{stem}.safetensors").is_file():
        return False
    if all(meta.get(k) == v for k, v in expected.items()):
        return True
    log.warning("%s/%s was built from other items or settings; rebuilding it", out_dir, stem)
    return False


def write_shard(out_dir: Path, shard: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the shard's tensors, then its json (last: the json marks the shard complete)."""
    stem = shard_name(shard)
    (out_dir / f"{stem}.json").unlink(missing_ok=True)  # a stale json must never vouch for new data
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(out_dir / f"{stem}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(meta, indent=1, ensure_ascii=False))


def collect_shards(out_dir: Path, num_shards: int, kind: str) -> list[dict]:
    """The json of every shard, or a CacheError naming the missing ones."""
    metas = [read_json(out_dir / f"{shard_name(k)}.json") for k in range(num_shards)]
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


def indexed_items(metas: list[dict]) -> list[dict]:
    """Every shard's item records in shard order, each naming the shard that holds it."""
    return [
        {**record, "shard": shard_name(k)}
        for k, meta in enumerate(metas)
        for record in meta["items"]
    ]


def write_index(out_dir: Path, index: dict) -> Path:
    """Write the cache's index.json (atomically: its presence marks the cache finished)."""
    path = out_dir / INDEX
    atomic_write_text(path, json.dumps(index, indent=1, ensure_ascii=False))
    return path


def release_memory(device: str | torch.device) -> None:
    """Give a deleted encoder's GPU memory back, so the next stage (training) starts clean."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
