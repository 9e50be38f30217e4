"""Resize, crop and flip an image to its bucket, keeping the SDXL micro-conditioning honest.

SDXL is conditioned on the original image size, the crop offset and the target size
(Podell et al. 2023, "SDXL", sec. 2.2). These are measured here on the real image, as the
diffusers and kohya trainers do: the crop top-left is in the coordinates of the resized
(and, when flipped, mirrored) image the crop is taken from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdxl.data.buckets import Bucket

Rng = random.Random | torch.Generator


@dataclass(frozen=True)
class MicroConditioning:
    """What SDXL's `time_ids` describe about one training image."""

    original_size: tuple[int, int]  # (h, w) of the image after EXIF rotation
    crop_top_left: tuple[int, int]  # (top, left) in resized, possibly flipped, coordinates
    target_size: tuple[int, int]  # (h, w) of the bucket
    flipped: bool = False

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), SDXL's order."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def _randint(rng: Rng, high: int) -> int:
    """A uniform integer in [0, high] from either kind of generator."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, high + 1, (), generator=rng))
    return rng.randint(0, high)


def _uniform(rng: Rng) -> float:
    """A uniform float in [0, 1) from either kind of generator."""
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng))
    return rng.random()


def resize_to_cover(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale (keeping the aspect ratio) so the image just covers the bucket on both sides."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / image.width, bucket_h / image.height)
    size = (max(bucket_w, round(image.width * scale)), max(bucket_h, round(image.height * scale)))
    if size == image.size:
        return image
    # PIL's LANCZOS widens its kernel when reducing, so downscaling is antialiased.
    return image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def transform_image(
    image: Image.Image,
    bucket: Bucket,
    *,
    random_crop: bool = False,
    flip_prob: float = 0.0,
    rng: Rng | None = None,
) -> tuple[torch.Tensor, MicroConditioning]:
    """Resize to cover `bucket`, maybe mirror, crop (random or centre) and normalise.

    `image` must already be EXIF-rotated RGB (see `sdxl.data.dataset.load_image`).
    Random crops and flips draw only from `rng` (a `random.Random` or `torch.Generator`).
    """
    if (random_crop or flip_prob > 0) and rng is None:
        raise ValueError("random_crop or flip_prob > 0 needs an explicit rng")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    bucket_w, bucket_h = bucket
    resized = resize_to_cover(image, bucket)
    flipped = flip_prob > 0 and _uniform(rng) < flip_prob
    if flipped:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    spare_h, spare_w = resized.height - bucket_h, resized.width - bucket_w
    if random_crop:
        top, left = _randint(rng, spare_h), _randint(rng, spare_w)
    else:
        top, left = spare_h // 2, spare_w // 2
    crop = resized.crop((left, top, left + bucket_w, top + bucket_h))
    cond = MicroConditioning(
        original_size=(image.height, image.width),
        crop_top_left=(top, left),
        target_size=(bucket_h, bucket_w),
        flipped=flipped,
    )
    return to_tensor(crop), cond
