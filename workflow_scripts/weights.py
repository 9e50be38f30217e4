"""weights: fill the model folder from config.yaml's weights source and write manifest.json."""

from typing import TYPE_CHECKING

from common import start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.prepare import WeightsConfig, prepare_weights  # noqa: E402 -- after the log is set up

prepare_weights(
    WeightsConfig.from_dict(snakemake.params.weights),
    snakemake.output.model,
    snakemake.output.manifest,
)
