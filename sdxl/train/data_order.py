"""The order of training samples: a pure function of (seed, epoch), so resume is exact.

Batches hold samples of one aspect bucket (static shapes per bucket). Every random choice of a
step (latent sample, noise, timestep, caption dropout, flip) is drawn on the training device
from a generator keyed by (seed, epoch, batch) for the whole padded global batch (per-GPU
batch x processes rows), then each rank takes its fixed rows: the result does not depend on
the number of processes or on interruptions. (The draws differ between CPU and CUDA, whose
generators differ; a run resumes on the device kind it started on.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def step_generator(
    seed: int, epoch: int, batch: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on `device` for one global batch (seeding it is a host call, not a sync)."""
    g = torch.Generator(device)
    return g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


def epoch_batches(
    buckets: Mapping[tuple[int, int], Sequence[int]], epoch: int, seed: int, batch_size: int
) -> list[list[int]]:
    """Shuffle within each bucket, cut into global batches, shuffle the batches.

    `batch_size` is the global batch (per-GPU batch x number of processes). No sample is ever
    dropped: a bucket's last batch may be short; it is padded to the full batch with weight-0
    rows (see `rank_rows`), so N processes at batch b equal 1 process at batch N*b.
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


def epoch_visits(train: Sequence[tuple[int, int]], reg: Sequence[tuple[int, int]]) -> list[int]:
    """The samples one epoch visits, from (sample, num_repeats) pairs of training and of
    regularization images.

    Each training sample comes num_repeats times; regularization samples fill as many visits
    as the training ones, as kohya does: a first pass with their own repeats, then one more
    visit each in turn until the counts match (cut short as soon as they do).
    """
    visits = [i for i, repeats in train for _ in range(repeats)]
    counts: dict[int, int] = {}
    filled, first = 0, True
    while reg and filled < len(visits):
        for i, repeats in reg:
            step = repeats if first else 1
            counts[i] = counts.get(i, 0) + step
            filled += step
            if filled >= len(visits):
                break
        first = False
    return visits + [i for i, n in counts.items() for _ in range(n)]


def rank_rows(rank: int, per_rank: int) -> slice:
    """This rank's fixed rows of the padded global batch; rows past the real samples are padding.

    Fixed rows (not a share of the real samples) keep every step's shapes static; a rank whose
    rows are all padding still runs the step and sends zero gradients to the sum.
    """
    return slice(rank * per_rank, (rank + 1) * per_rank)
