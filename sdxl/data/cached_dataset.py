"""The reader of the training caches: checked indexes, and samples whose tensors load lazily.

The trainer loads only these files: a latent cache (sdxl.data.latent_cache) and a text cache
(sdxl.data.text_cache) built from the same item list.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sdxl.data.buckets import Bucket
from sdxl.data.shards import EMPTY, INDEX, VERSION, CacheError, read_json


def is_cache_dir(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True if `path` holds a finished cache (of `kind` 'latents' or 'text', if given)."""
    index = read_json(Path(path) / INDEX)
    if not isinstance(index, dict) or index.get("version") != VERSION:
        return False
    return index.get("kind") in (("latents", "text") if kind is None else (kind,))


def _read_index(folder: Path, kind: str) -> dict:
    """A cache's index.json, checked; a CacheError naming the folder and the fix otherwise."""
    step = "build_latent_cache / merge_latent_index" if kind == "latents" else "build_text_cache"
    index = read_json(folder / INDEX)
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


def _check_settings(latent_dir: Path, settings: dict, expect: Mapping[str, Any]) -> None:
    """The latents must have been cached as the run expects (same buckets, crops, flips...)."""
    differ = [k for k, v in expect.items() if settings.get(k) != v]
    if differ:
        cached = ", ".join(f"{k}={settings.get(k)!r}" for k in differ)
        wanted = ", ".join(f"{k}={expect[k]!r}" for k in differ)
        flag = " (--image_size on the command line)" if "image_size" in differ else ""
        raise CacheError(
            f"latent cache {latent_dir} was built with {cached} but this run expects {wanted}; "
            f"train with the cache's values{flag}, or from the images to cache them anew"
        )


class CachedDataset(torch.utils.data.Dataset):
    """Training samples from a latent cache and a text cache; tensors are read lazily.

    `expect`: latent settings (as `latent_cache.latent_settings` names them) the run needs; a
    cache built otherwise is a CacheError.
    """

    def __init__(
        self,
        latent_dir: str | os.PathLike,
        text_dir: str | os.PathLike,
        expect: Mapping[str, Any] | None = None,
    ):
        self.latent_dir, self.text_dir = Path(latent_dir), Path(text_dir)
        latents = _read_index(self.latent_dir, "latents")
        texts = _read_index(self.text_dir, "text")
        _check_agreement(self.latent_dir, self.text_dir, latents, texts)
        _check_settings(self.latent_dir, latents["settings"], expect or {})
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
