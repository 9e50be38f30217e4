"""weights: fill the model folder from config.yaml's weights source and write manifest.json."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.prepare import WeightsConfig, prepare_weights  # noqa: E402 -- after the log is set up

prepare_weights(
    WeightsConfig.from_dict(snakemake.params.weights),
    snakemake.output.model,
    snakemake.output.manifest,
)
manifest = json.loads(Path(snakemake.output.manifest).read_text())
finish(snakemake, f"{manifest['kind']} SDXL, {len(manifest['files'])} files")
