"""Items 0..n-1 cut into contiguous shards: the one formula of the caches' shards, the
workflow's generate jobs and its evaluation jobs. Pure Python: the workflow uses it when it is
parsed (no torch there).
"""

from __future__ import annotations

import math
from itertools import pairwise


def shard_ranges(
    n: int, *, num_shards: int | None = None, items_per_shard: int | None = None
) -> list[range]:
    """Item positions 0..n-1 cut into contiguous shards: `num_shards` near-equal ones, or ones
    of `items_per_shard` positions (the last may be shorter; at least one shard)."""
    if (num_shards is None) == (items_per_shard is None):
        raise ValueError("give exactly one of num_shards and items_per_shard")
    if items_per_shard is not None:
        if items_per_shard < 1:
            raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
        count = max(1, math.ceil(n / items_per_shard))
        bounds = [min(n, k * items_per_shard) for k in range(count + 1)]
    else:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        bounds = [k * n // num_shards for k in range(num_shards + 1)]
    return [range(start, stop) for start, stop in pairwise(bounds)]
