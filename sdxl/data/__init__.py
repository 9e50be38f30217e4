"""Training data: folder scan and validation, aspect-ratio buckets, transforms (and caches)."""

from sdxl.data.buckets import Bucket, assign_bucket, batch_by_bucket, make_buckets
from sdxl.data.dataset import (
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
    DatasetError,
    Item,
    Problem,
    ValidationResult,
    load_image,
    read_caption,
    read_manifest,
    scan_dataset,
    validate_dataset,
    write_manifest,
    write_problems,
)
from sdxl.data.transforms import MicroConditioning, transform_image

__all__ = [
    "DEFAULT_MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "Bucket",
    "DatasetError",
    "Item",
    "MicroConditioning",
    "Problem",
    "ValidationResult",
    "assign_bucket",
    "batch_by_bucket",
    "load_image",
    "make_buckets",
    "read_caption",
    "read_manifest",
    "scan_dataset",
    "transform_image",
    "validate_dataset",
    "write_manifest",
    "write_problems",
]
