"""report: the training, validation, dataset, generation, evaluation, runtime and configuration
pages, and copies of the dataset problems page and the contact sheet (every report item comes
from this rule, so none carries another job's params into report.html)."""

from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.report import ReportInputs, ReportOutputs, build_report  # noqa: E402
from sdxl.report.evaluation import write_evaluation  # noqa: E402

build_report(ReportInputs.of(snakemake.input), ReportOutputs.of(snakemake.output))
write_evaluation(snakemake.input.metrics or None, snakemake.output.evaluation)
finish(snakemake, "the pages of results/report.html, which snakemake --report bundles")
