"""evaluate_reference: Inception features of one fixed range of the reference images."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.evaluate.features import FeatureConfig  # noqa: E402
from sdxl.evaluate.run import extract_shard, reference_items  # noqa: E402

reference_dir = snakemake.params.reference_dir
cfg = FeatureConfig(**snakemake.params.features, clip_model=None, device=claim.torch_device)
first, stop = snakemake.params.indices
images = snakemake.input.images  # a str when it is one file
images = [images] if isinstance(images, str) else list(images)
# With reference_dir the inputs are this shard's images; else the manifest of the training items.
files = [Path(p) for p in images] if reference_dir else reference_items(None, images[0])[first:stop]
source = reference_dir or "the training images (results/data/manifest.csv)"
extract_shard(files, None, cfg, snakemake.output.features, source=source)
finish(snakemake, f"Inception features of {len(files)} reference images")
