# Shared helpers: config validation, output locations, and the library code each stage runs.
import os
from pathlib import Path

from snakemake.utils import validate

from sdxl import workflow_inputs as inputs
from sdxl.code_inputs import script_code
from sdxl.generate.prompts import index_width
from sdxl.models.configs import BUILTIN_TINY
from sdxl.sharding import shard_ranges
from sdxl.workflow_config import check_config, check_settings

# check_config first: one line naming the bad key (snakemake's error dumps ~180 lines);
# validate then fills in the schema's defaults.
check_config(config, os.path.join(workflow.basedir, "schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml")
check_settings(config)  # what the schema cannot say (one key against another)

WEIGHTS_DIR = "results/weights"
CACHE_DIR = "results/cache"
TRAIN_DIR = f"results/train/{config['run']}"
VALIDATION_DIR = f"results/validation/{config['run']}"
GENERATE_DIR = "results/generate"
BENCHMARK_DIR = "results/benchmarks"
DATASET_DIR = "results/dataset"
LOG_DIR = "results/logs"
LATENT_SHARDS = [f"{k:05d}" for k in range(config["cache"]["latents"]["shards"])]
# Generate job k makes the images of GENERATE_RANGES[k]: fixed ranges of images_per_shard, so
# raising num_images adds jobs and leaves the finished ones as they are.
GENERATE_RANGES = shard_ranges(
    config["generate"]["num_images"],
    items_per_shard=config["generate"]["images_per_shard"],
)
GENERATE_SHARDS = [str(k) for k in range(len(GENERATE_RANGES))]
# output_format webdataset: the finished dataset is also packed into tars (rule pack_webdataset).
WEBDATASET = config["generate"]["output_format"] == "webdataset"
EVAL_DIR = "results/eval"
EVALUATE = config["evaluate"]["enabled"]


def code(script, without=(), tiny=False):
    """The code inputs of a job running workflow_scripts/<script>.py, relative to the workdir
    (the script, the helpers beside it, the library modules it can import: see
    sdxl/code_inputs.py). A code change then reruns exactly the jobs that can load it.

    `without`: modules the job never loads with this workflow's settings. sdxl/tiny.py (it
    makes the builtin:tiny model) counts only with `tiny`: every job but weights is given the
    prepared model folder, never builtin:tiny.
    """
    skip = [*without, *([] if tiny else ["sdxl.tiny"])]
    path = os.path.join(workflow.basedir, "workflow_scripts", f"{script}.py")
    found = script_code(Path(path), Path(workflow.basedir), skip)
    return [os.path.relpath(p) for p in found]


def weights_code():
    return code("weights", tiny=config["weights"]["source"] == BUILTIN_TINY)


def weights_source(wildcards):
    """A local weights folder or file is an input (its changes rerun the stage); ids are not."""
    source = os.path.expanduser(config["weights"]["source"])
    return [source] if os.path.exists(source) else []


def dataset_files(wildcards):
    return inputs.dataset_files(config)


def prompts_file(wildcards):
    """The prompt file, through a function: Snakemake writes every rule's literal input paths
    unescaped into report.html, and this one is the user's to choose."""
    return config["generate"]["prompts_file"]


def sample_prompts_file(wildcards):
    """train.sample_prompts, when set (an input: editing it reruns only validation)."""
    path = config["train"]["sample_prompts"]
    return [path] if path else []


def shard_range(wildcards):
    """[start, stop) of the images generate job `shard` makes."""
    images = GENERATE_RANGES[int(wildcards.shard)]
    return [images.start, images.stop]


# Evaluate_reference job k reads the reference images of REFERENCE_RANGES[k]; the folder is
# listed once here, not once per job.
REFERENCE_FILES = inputs.reference_dir_files(config) if EVALUATE else []
REFERENCE_RANGES = (
    shard_ranges(
        inputs.reference_count(config, REFERENCE_FILES),
        items_per_shard=config["evaluate"]["images_per_shard"],
    )
    if EVALUATE
    else []
)
REFERENCE_SHARDS = [str(k) for k in range(len(REFERENCE_RANGES))]


def reference_range(wildcards):
    """[start, stop) of the reference images evaluate_reference job `shard` reads."""
    images = REFERENCE_RANGES[int(wildcards.shard)]
    return [images.start, images.stop]


def reference_inputs(wildcards):
    """The validated training items (the manifest), or this shard's reference images."""
    if not config["evaluate"]["reference_dir"]:
        return rules.validate_captions.output.manifest
    start, stop = reference_range(wildcards)
    return REFERENCE_FILES[start:stop]


def evaluate_settings(*keys):
    return {k: config["evaluate"][k] for k in keys}


def benchmark_file(name):
    """Snakemake's runtime and peak-memory record of a job (the report's Runtime page)."""
    return os.path.join(BENCHMARK_DIR, f"{name}.tsv")


def log_file(name):
    return os.path.join(LOG_DIR, f"{name}.log")


def all_benchmarks():
    """The benchmark file of every job of the DAG but the report's own, in pipeline order."""
    run = config["run"]
    names = ["weights", "validate_captions"]
    names += [f"cache_latents/shard-{k}" for k in LATENT_SHARDS]
    names += [
        "merge_latents",
        "cache_text",
        f"train_lora/{run}",
        f"validate_lora/{run}",
    ]
    names += [f"generate/shard-{k}" for k in GENERATE_SHARDS]
    names += ["assemble", "record_config"]
    names += ["pack_webdataset"] if WEBDATASET else []
    if EVALUATE:
        names += [f"evaluate_features/shard-{k}" for k in GENERATE_SHARDS]
        names += [f"evaluate_reference/shard-{k}" for k in REFERENCE_SHARDS]
        names += ["evaluate"]
    return [benchmark_file(name) for name in names]
