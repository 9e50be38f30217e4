"""evaluate_features: Inception features and CLIP embeddings of one generate shard's images."""

from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.evaluate.features import FeatureConfig  # noqa: E402
from sdxl.evaluate.run import extract_shard, marker_items  # noqa: E402

cfg = FeatureConfig(**snakemake.params.features, device=claim.torch_device)
files, prompts = marker_items(snakemake.input.done)
source = f"generate shard {snakemake.wildcards.shard}"
extract_shard(files, prompts, cfg, snakemake.output.features, source=source)
finish(snakemake, f"features of the {len(files)} images of {source}")
