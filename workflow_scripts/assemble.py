"""assemble: hard-link every shard's images into one folder and write the COCO dataset files."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, start
from generation import generation_config

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.generate.assemble import assemble_dataset  # noqa: E402

markers = [Path(p) for p in snakemake.input.shards]
# The images record the generate jobs' code version; the markers say which it was.
versions = {json.loads(p.read_text())["code_version"] for p in markers}
out = Path(snakemake.output.captions).parent
cfg = generation_config(snakemake.params.generate, snakemake.input, out,
                        snakemake.params.num_images, snakemake.params.index_width,
                        code_version=versions.pop() if len(versions) == 1 else "mixed")  # fmt: skip
assemble_dataset(cfg, markers, out)
finish(snakemake, f"{snakemake.params.num_images} images linked in {out}/")
