"""record_config: write the run's whole configuration (defaults filled in) as results/config.json.

The report's config page is rendered from this file, so the report rule itself holds no
user strings in its params (see rules/report.smk).
"""

from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.report import write_config_snapshot  # noqa: E402

write_config_snapshot(snakemake.params.config, snakemake.output.config)
finish(snakemake, "the whole configuration, defaults filled in")
