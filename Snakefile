# The SDXL LoRA pipeline: weights -> validated dataset -> latent and text caches -> LoRA
# training -> sharded generation -> one COCO dataset -> evaluation -> report.
#
#   snakemake --profile profiles/demo                      # tiny CPU demo, a few minutes
#   snakemake --cores all --resources gpu=4                # this config.yaml on a GPU box
#   snakemake --workflow-profile profiles/slurm            # a SLURM cluster
#   snakemake --report results/report.html                 # the report of the last run
import sys

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, workflow.basedir)  # the sdxl package beside this file
from sdxl.workflow_config import check_yaml_file

# A broken config.yaml: one line naming file:line (snakemake's own message names neither).
check_yaml_file("config.yaml")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/data.smk"
include: "rules/cache.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


localrules:
    all,
    weights,
    merge_latents,
    record_config,
    report,


rule all:
    default_target: True
    input:
        rules.assemble.output,
        rules.pack_webdataset.output if WEBDATASET else [],
        rules.evaluate.output if EVALUATE else [],
        rules.report.output,
