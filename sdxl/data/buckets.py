"""Aspect-ratio buckets: train non-square images without squashing or over-cropping them.

Every bucket (W, H) is a multiple of `step` on both sides with W*H as close to
`image_size**2` as the step allows without exceeding it (the NovelAI / kohya / SDXL-paper
scheme). The 1024 family therefore contains the SDXL training sizes 1024x1024, 1152x896,
1216x832, 1344x768, ... and their transposes.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

Bucket = tuple[int, int]  # (W, H) in pixels


def make_buckets(image_size: int, step: int = 64, max_aspect: float = 4.0) -> list[Bucket]:
    """All (W, H) buckets of area <= image_size**2, sorted from tallest to widest.

    For each short side s = step, 2*step, ... the long side is the largest multiple of
    `step` with s * long <= image_size**2; pairs more elongated than `max_aspect` are left out.
    The square (image_size, image_size) is always included.
    """
    if step <= 0 or step % 8:
        raise ValueError(f"bucket step must be a positive multiple of 8 (VAE factor), got {step}")
    if image_size < step or image_size % step:
        raise ValueError(f"image_size must be a positive multiple of {step}, got {image_size}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = image_size * image_size
    buckets: set[Bucket] = set()
    for short in range(step, image_size + 1, step):
        long = (area // short) // step * step
        if long < short or long / short > max_aspect:
            continue
        buckets.update({(short, long), (long, short)})
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space) to width/height.

    Ties go to the earlier bucket in `buckets`, so the choice is deterministic.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_aspect))


def batch_by_bucket(
    keys: Sequence[Hashable], batch_size: int, *, rng: random.Random, drop_last: bool = False
) -> list[list[int]]:
    """Shuffle item indices into batches whose items all share one bucket key.

    Items are shuffled within each bucket, cut into batches, and the batches shuffled, all
    through `rng`, so the order depends only on its seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    batches = []
    for key in sorted(groups, key=repr):  # a fixed order, whatever the insertion order
        indices = groups[key]
        rng.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    rng.shuffle(batches)
    return batches
