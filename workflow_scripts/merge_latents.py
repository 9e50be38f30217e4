"""merge_latents: write the latent cache's index.json once every shard is built."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.data.latent_cache import merge_latent_index  # noqa: E402

merge_latent_index(Path(snakemake.output.index).parent, num_shards=len(snakemake.input.meta))
finish(snakemake, f"the index of {len(snakemake.input.meta)} latent shard(s)")
