"""report: the loss curve, the configuration page, the validation grids, and copies of the
dataset problems page and the contact sheet (every report item comes from this rule)."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.report import build_report  # noqa: E402

run_dir = Path(snakemake.input.lora).parent
build_report(
    run_dir / "metrics.csv", run_dir / "samples", snakemake.input.config,
    loss_svg=snakemake.output.loss, config_html=snakemake.output.config,
    validation_dir=snakemake.output.validation,
    copies={snakemake.input.problems: snakemake.output.problems,
            snakemake.input.sheet: snakemake.output.sheet},
)  # fmt: skip
