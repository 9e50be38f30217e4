# Shared helpers: config validation, output locations, and the library code each stage runs.
import math
import os

from snakemake.utils import validate

from sdxl.dataset_config import caption_settings
from sdxl.generate.prompts import index_width
from sdxl.train.config import RUNTIME_SETTINGS, VALIDATION_SETTINGS
from sdxl.workflow_config import check_config, check_settings

# check_config first: one line naming the bad key (snakemake's error dumps ~180 lines);
# validate then fills in the schema's defaults.
check_config(config, os.path.join(workflow.basedir, "schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml")
check_settings(config)  # what the schema cannot say (one key against another)

BUILTIN_TINY = "builtin:tiny"
# What sdxl.data.dataset.scan_dataset reads (not imported: pandas and PIL would slow every
# parse of the workflow); tests/test_workflow.py checks that both agree.
DATA_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".txt")
WEIGHTS_DIR = "results/weights"
CACHE_DIR = "results/cache"
TRAIN_DIR = f"results/train/{config['run']}"
VALIDATION_DIR = f"results/validation/{config['run']}"
GENERATE_DIR = "results/generate"
BENCHMARK_DIR = "results/benchmarks"
DATASET_DIR = "results/dataset"
LOG_DIR = "results/logs"
LATENT_SHARDS = [f"{k:05d}" for k in range(config["cache"]["latents"]["shards"])]
# Generate job k makes images [k * images_per_shard, (k + 1) * images_per_shard): fixed ranges, so
# raising num_images adds jobs and leaves the finished ones as they are.
IMAGES_PER_SHARD = config["generate"]["images_per_shard"]
# output_format webdataset: the finished dataset is also packed into tars (rule pack_webdataset).
WEBDATASET = config["generate"]["output_format"] == "webdataset"
GENERATE_SHARDS = [
    str(k)
    for k in range(math.ceil(config["generate"]["num_images"] / IMAGES_PER_SHARD))
]
EVAL_DIR = "results/eval"
EVALUATE = config["evaluate"]["enabled"]

# The library modules (under sdxl/) each stage imports. They are declared as inputs, so a
# code change reruns exactly the stages whose results it can change. Left out on purpose, as
# they cannot change a result: the GPU allocator (devices.py), process hygiene (procs.py:
# locks, watchdogs), error messages (errors.py, cli/errors.py) and the test pause hook. The
# generate jobs' code is recorded in every image (a code change remakes them all), so it leaves
# out generate/assemble.py too: it only writes their shard-K.json, which assemble checks, and
# generate/webdataset.py, which only pack_webdataset (and the CLI) runs.
CODE = {
    "weights": ["prepare.py", "hub.py", "weights.py", "convert.py", "utils.py"],
    "tiny": [
        "tiny.py",
        "models/configs.py",
        "models/unet.py",
        "models/vae.py",
        "models/clip.py",
    ],
    "validate": ["data/dataset.py", "text.py", "utils.py"],
    "latents": ["data/cache.py", "data/buckets.py", "data/transforms.py", "data/dataset.py",
                "models/vae.py", "weights.py", "convert.py", "utils.py"],  # fmt: skip
    "merge": ["data/cache.py", "utils.py"],
    "text": ["data/cache.py", "data/dataset.py", "text.py", "models/clip.py", "weights.py",
             "convert.py", "utils.py"],  # fmt: skip
    "train": ["train/__init__.py", "train/launch.py", "train/batches.py", "train/caches.py",
              "train/checkpoint.py", "train/step.py",
              "train/config.py", "train/data_order.py", "train/distributed.py", "train/ema.py",
              "train/export.py", "train/loop.py", "train/loss.py", "train/metrics.py",
              "train/optim.py", "train/snapshots.py", "train/sample_prompts.py", "data/cache.py",
              "train/text_encoding.py", "text_lora.py",
              "lora.py", "lora_formats.py", "models/unet.py", "models/vae.py", "models/clip.py",
              "schedulers.py", "text.py", "weights.py", "convert.py", "utils.py",
              "dataset_config.py"],  # fmt: skip
    "validation": ["train/validation.py", "train/snapshots.py", "train/config.py",
                   "train/sample_prompts.py", "dataset_config.py", "pipeline.py", "text_lora.py",
                   "schedulers.py", "lora.py", "lora_formats.py", "models/unet.py",
                   "models/vae.py", "models/clip.py", "text.py", "images.py", "weights.py",
                   "convert.py", "utils.py"],  # fmt: skip
    "generate": ["generate/prompts.py", "generate/coco_prompts.py", "generate/run.py",
                 "generate/writers.py", "generate/infotext.py", "pipeline.py", "schedulers.py",
                 "lora.py", "lora_formats.py", "text_lora.py", "models/unet.py",
                 "models/vae.py", "models/clip.py", "text.py", "weights.py", "convert.py",
                 "utils.py"],  # fmt: skip
    "assemble": ["generate/assemble.py", "generate/coco.py", "generate/coco_prompts.py",
                 "generate/prompts.py", "generate/run.py",
                 "generate/writers.py", "generate/infotext.py", "images.py", "prepare.py",
                 "utils.py"],  # fmt: skip
    "webdataset": ["generate/webdataset.py", "generate/writers.py", "generate/infotext.py",
                   "utils.py"],  # fmt: skip
    "evaluate": ["evaluate/__init__.py", "evaluate/run.py", "evaluate/features.py",
                 "evaluate/inception.py", "evaluate/clip.py", "evaluate/metrics.py",
                 "data/dataset.py", "tiny.py", "models/configs.py", "utils.py"],  # fmt: skip
    "report": ["report/__init__.py", "report/charts.py", "report/images.py", "report/pages.py",
               "report/readers.py", "report/evaluation.py", "data/dataset.py", "text.py", "images.py",
               "utils.py"],  # fmt: skip
}


def code(stage):
    """The stage's library modules and the scripts' shared helpers, relative to the workdir."""
    files = [os.path.join(workflow.basedir, "sdxl", name) for name in CODE[stage]]
    helpers = ["common.py"] + (
        ["generation.py"] if stage in ("generate", "assemble") else []
    )
    files += [
        os.path.join(workflow.basedir, "workflow_scripts", name) for name in helpers
    ]
    return [os.path.relpath(path) for path in files]


def weights_code():
    """Tiny weights are made by the model code itself, so it counts only for builtin:tiny."""
    tiny = config["weights"]["source"] == BUILTIN_TINY
    return code("weights") + (code("tiny") if tiny else [])


def weights_source(wildcards):
    """A local weights folder or file is an input (its changes rerun the stage); ids are not."""
    source = os.path.expanduser(config["weights"]["source"])
    return [source] if os.path.exists(source) else []


def dataset_files(wildcards):
    """Every image and caption file of the dataset: adding or editing one reruns validation."""
    found = []
    for where, root, suffixes in data_folders():
        if not os.path.isdir(root):
            raise ValueError(
                f"{where}: {root} is not a folder; point it at your images"
            )
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [
                os.path.join(folder, name)
                for name in sorted(files)
                if not name.startswith(".") and name.lower().endswith(suffixes)
            ]
    return found


def data_folders():
    """(config key, folder, file suffixes) of data.dir, or of each of data.subsets."""
    subsets = config["data"]["subsets"]
    if not subsets:
        return [("data.dir", config["data"]["dir"], DATA_SUFFIXES)]
    return [
        (
            f"data.subsets[{k}].image_dir",
            s["image_dir"],
            DATA_SUFFIXES[:-1] + (s.get("caption_extension", ".txt").lower(),),
        )
        for k, s in enumerate(subsets)
    ]


def data_settings():
    """What the validated items depend on: data.subsets' caption rules, not how training uses
    the items (repeats, is_reg, shuffling, dropout, flips: train_settings has those)."""
    return {**config["data"], "subsets": caption_settings(config["data"]["subsets"])}


def prompts_file(wildcards):
    """The prompt file, through a function: Snakemake writes every rule's literal input paths
    unescaped into report.html, and this one is the user's to choose."""
    return config["generate"]["prompts_file"]


def sample_prompts_file(wildcards):
    """train.sample_prompts, when set (an input: editing it reruns only validation)."""
    path = config["train"]["sample_prompts"]
    return [path] if path else []


def train_settings():
    """What the LoRA learns, for how long, and which snapshots it keeps, plus the image size the
    latents were cached at (one source of truth). A change reruns train_lora, which continues
    from a checkpoint where the result equals a straight run (see sdxl/train/loop.py).

    Left out, so they rerun nothing: speed and logging settings (read from the config by the
    job) and the validation settings (the validate_lora rule's). gpus is in: batch_size is per
    GPU, so the GPU count changes what is learned.
    """
    skip = {*RUNTIME_SETTINGS, *VALIDATION_SETTINGS}
    learned = {k: v for k, v in config["train"].items() if k not in skip}
    return {
        **learned,
        "image_size": config["cache"]["latents"]["image_size"],
        "subsets": config["data"]["subsets"],
    }


def validation_settings():
    """What the validation grids depend on besides the LoRA files."""
    train = config["train"]
    return {
        **{k: train[k] for k in VALIDATION_SETTINGS},
        "seed": train["seed"],
        "image_size": config["cache"]["latents"]["image_size"],
    }


def generation_settings():
    """What every image depends on (its own index aside); not the image count (each job makes a
    fixed range) nor speed-only settings (compile, channels_last: read from the config), nor
    how the dataset is packed (output_format, webdataset_shard_size: the pack_webdataset rule's).
    """
    skip = {"num_images", "images_per_shard", "compile", "channels_last",
            "output_format", "webdataset_shard_size"}  # fmt: skip
    return {k: v for k, v in config["generate"].items() if k not in skip}


def shard_range(wildcards):
    """[start, stop) of the images generate job `shard` makes."""
    start = int(wildcards.shard) * IMAGES_PER_SHARD
    return [start, min(start + IMAGES_PER_SHARD, config["generate"]["num_images"])]


def _reference_count():
    """How many reference images there may be, known when the workflow is parsed: the images
    under evaluate.reference_dir, else the training dataset's image files (items that
    validation drops leave the last reference shards short, or empty)."""
    ref = config["evaluate"]["reference_dir"]
    if not ref:
        return sum(not p.lower().endswith(".txt") for p in dataset_files(None))
    return len(reference_dir_files())


def reference_dir_files():
    """The images under evaluate.reference_dir (as sdxl.evaluate.features.image_files)."""
    root = config["evaluate"]["reference_dir"]
    if not os.path.isdir(root):
        raise ValueError(f"evaluate.reference_dir: {root} is not a folder of images")
    found = []
    for folder, dirs, files in os.walk(root):
        found += [
            os.path.join(folder, n) for n in files if n.lower().endswith(EVAL_SUFFIXES)
        ]
    return sorted(found)


EVAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_PER_SHARD = config["evaluate"]["images_per_shard"]
REFERENCE_SHARDS = (
    [str(k) for k in range(max(1, math.ceil(_reference_count() / REFERENCE_PER_SHARD)))]
    if EVALUATE
    else []
)


def reference_range(wildcards):
    """[start, stop) of the reference images evaluate_reference job `shard` reads."""
    start = int(wildcards.shard) * REFERENCE_PER_SHARD
    return [start, start + REFERENCE_PER_SHARD]


def reference_inputs(wildcards):
    """The validated training items (the manifest), or this shard's reference images."""
    if not config["evaluate"]["reference_dir"]:
        return rules.validate_captions.output.manifest
    start, stop = reference_range(wildcards)
    return reference_dir_files()[start:stop]


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
