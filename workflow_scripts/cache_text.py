"""cache_text: encode every caption (and the empty one) with both text encoders (one GPU)."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, precision, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.data.text_cache import build_text_cache_from_manifest  # noqa: E402

hp = snakemake.params.text
build_text_cache_from_manifest(
    snakemake.input.manifest, snakemake.input.model, Path(snakemake.output.index).parent,
    batch_size=hp["batch_size"], device=claim.torch_device,
    dtype=precision(claim, hp["precision"]), progress=True,
)  # fmt: skip
finish(snakemake, "both text encoders' embeddings of every caption and of the empty one")
