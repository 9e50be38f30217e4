"""pack_webdataset: pack the assembled dataset into tars (PNG + .txt + .json per image)."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.generate.webdataset import write_webdataset  # noqa: E402

dataset = Path(snakemake.input.metadata).parent
index = write_webdataset(dataset, Path(snakemake.output.index).parent, snakemake.params.shard_size)
finish(snakemake, f"{index['samples']} images in {len(index['shards'])} tar file(s) beside it")
