"""The order of training samples: a pure function of (seed, epoch), so resume is exact.

Batches hold samples of one aspect bucket (static shapes per bucket). Every random choice of a
step (latent sample, noise, timestep, caption dropout, flip) is drawn on the CPU from a
generator keyed by (seed, epoch, batch) for the whole global batch, then each rank takes its
slice: the result does not depend on the number of processes or on interruptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def step_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A CPU generator for one global batch."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


def epoch_batches(
    buckets: Mapping[tuple[int, int], Sequence[int]], epoch: int, seed: int, batch_size: int
) -> list[list[int]]:
    """Shuffle within each bucket, cut into global batches, shuffle the batches.

    `batch_size` is the global batch (per-GPU batch x number of processes). No sample is ever
    dropped: a bucket's last batch may be short, and ranks whose share of it is empty take part
    in the step with zero gradients, so N processes at batch b equal 1 process at batch N*b.
    """
    g = torch.Generator("cpu").manual_seed(seed * 7919 + epoch)
    batches = []
    for bucket in sorted(buckets):
        idx = list(buckets[bucket])
        perm = torch.randperm(len(idx), generator=g).tolist()
        shuffled = [idx[i] for i in perm]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def rank_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous share of a global batch of n samples for `rank` (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
