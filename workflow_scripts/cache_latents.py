"""cache_latents: encode one shard of the validated images with the VAE (one GPU)."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, precision, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.data.latent_cache import build_latent_cache_from_manifest  # noqa: E402

hp = snakemake.params.latents
build_latent_cache_from_manifest(
    snakemake.input.manifest, snakemake.input.model, Path(snakemake.output.tensors).parent,
    image_size=hp["image_size"], shard_index=int(snakemake.wildcards.shard),
    num_shards=hp["shards"], batch_size=hp["batch_size"], random_crop=hp["random_crop"],
    flip=hp["flip"], seed=hp["seed"], device=claim.torch_device,
    dtype=precision(claim, hp["precision"]), progress=True,
)  # fmt: skip
finish(snakemake, f"VAE latents of shard {snakemake.wildcards.shard} of {hp['shards']}")
