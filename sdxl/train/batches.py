"""Host side of a training step: a rank's rows of a global batch, padded, pinned, read ahead.

Every step of a bucket has the same shapes: a bucket's short last batch is padded to the full
per-rank batch with zero rows of weight 0 (nothing is dropped; see `data_order`). Each row
carries both cached variants (plain and mirrored), so the step's flip draw, made on the
device, picks one there with `torch.where` and the host never has to read it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from sdxl.data.cached_dataset import CachedDataset
from sdxl.train.data_order import rank_rows

SHARED = ("prompt_embeds", "pooled")  # the same for both variants of an item
PER_VARIANT = ("mean", "std", "time_ids")  # plain and mirrored differ (pixels, crop box)

T = TypeVar("T")
R = TypeVar("R")


def read_rows(
    data: CachedDataset, partner: dict[int, int], global_batch: list[int], rank: int,
    per_rank: int, micro_batches: int, pin: bool, scale: dict[int, float] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """This rank's `per_rank` rows of `global_batch`, stacked (B, ...), real rows first.

    `weight` (B,) is 1 / (real samples in the global batch x micro-batches in the step) for a
    real row and 0 for padding, so the weighted sum is the step's mean loss and padding adds
    exactly zero loss and zero gradient. `<field>_flip` holds the mirrored variant. `scale`:
    per-sample loss multipliers (kohya's prior_loss_weight for regularization images).
    """
    rows = global_batch[rank_rows(rank, per_rank)]
    items = [data[i] for i in rows]
    flips = [
        data[partner[i]] if partner[i] != i else item for i, item in zip(rows, items, strict=True)
    ]
    like = items[0] if items else data[global_batch[0]]  # shapes for an all-padding share
    out = {}
    for key in SHARED + PER_VARIANT:
        out[key] = _padded([it[key] for it in items], like[key], per_rank)
    for key in PER_VARIANT:
        out[f"{key}_flip"] = _padded([it[key] for it in flips], like[key], per_rank)
    weight = torch.zeros(per_rank)
    weight[: len(rows)] = 1.0 / (len(global_batch) * micro_batches)
    if scale:
        weight[: len(rows)] *= torch.tensor([scale.get(i, 1.0) for i in rows])
    out["weight"] = weight
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def _padded(rows: list[torch.Tensor], like: torch.Tensor, size: int) -> torch.Tensor:
    """Stack `rows` and append zero rows up to `size` (zeros keep the padded forward finite)."""
    out = torch.zeros((size, *like.shape), dtype=like.dtype)
    if rows:
        out[: len(rows)] = torch.stack(rows)
    return out


def read_ahead(read: Callable[[T], R], jobs: Iterable[T]) -> Iterator[R]:
    """`read(job)` for each job, in order, with the next one read in a thread meanwhile.

    The training step is asynchronous on CUDA, so reading the safetensors cache for step k+1
    overlaps step k; on the CPU it overlaps at least the Python side of the step.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = None
        for job in jobs:
            upcoming = pool.submit(read, job)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()
