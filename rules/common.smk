# Shared helpers: config validation, output locations, and the library code each stage runs.
import os

from snakemake.utils import validate

from sdxl.workflow_config import check_config

# check_config first: one line naming the bad key (snakemake's error dumps ~180 lines);
# validate then fills in the schema's defaults.
check_config(config, os.path.join(workflow.basedir, "schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml")

BUILTIN_TINY = "builtin:tiny"
# What sdxl.data.dataset.scan_dataset reads (not imported: pandas and PIL would slow every
# parse of the workflow); tests/test_workflow.py checks that both agree.
DATA_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".txt")
WEIGHTS_DIR = "results/weights"
CACHE_DIR = "results/cache"
TRAIN_DIR = f"results/train/{config['run']}"
GENERATE_DIR = "results/generate"
DATASET_DIR = "results/dataset"
LOG_DIR = "results/logs"
LATENT_SHARDS = [f"{k:05d}" for k in range(config["cache"]["latents"]["shards"])]
GENERATE_SHARDS = [str(k) for k in range(config["generate"]["shards"])]

# The library modules (under sdxl/) each stage imports. They are declared as inputs, so a
# code change reruns exactly the stages whose results it can change. Left out on purpose, as
# they cannot change a result: the GPU allocator (devices.py), process hygiene (procs.py:
# locks, watchdogs), error messages (errors.py, cli/errors.py) and the test pause hook.
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
              "train/optim.py", "train/validation.py", "data/cache.py", "lora.py",
              "lora_formats.py", "models/unet.py", "models/vae.py", "models/clip.py",
              "schedulers.py", "pipeline.py", "text.py", "images.py", "weights.py", "convert.py",
              "utils.py"],  # fmt: skip
    "generate": ["generate/prompts.py", "generate/run.py", "generate/writers.py", "pipeline.py",
                 "schedulers.py", "lora.py", "lora_formats.py", "models/unet.py",
                 "models/vae.py", "models/clip.py", "text.py", "weights.py", "convert.py",
                 "utils.py"],  # fmt: skip
    "assemble": ["generate/coco.py", "generate/prompts.py", "generate/run.py",
                 "generate/writers.py", "images.py", "prepare.py", "utils.py"],  # fmt: skip
    "report": ["report.py", "utils.py"],
}


def code(stage):
    """The stage's library modules and the scripts' shared helper, relative to the workdir."""
    files = [os.path.join(workflow.basedir, "sdxl", name) for name in CODE[stage]]
    files.append(os.path.join(workflow.basedir, "workflow_scripts", "common.py"))
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
    root = config["data"]["dir"]
    if not os.path.isdir(root):
        raise ValueError(
            f"data.dir: {root} is not a folder; point it at your image+caption folder"
        )
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(folder, name)
            for name in sorted(files)
            if not name.startswith(".") and name.lower().endswith(DATA_SUFFIXES)
        ]
    return found


def prompts_file(wildcards):
    """The prompt file, through a function: Snakemake writes every rule's literal input paths
    unescaped into report.html, and this one is the user's to choose."""
    return config["generate"]["prompts_file"]


def train_settings():
    """The training slice plus the image size the latents were cached at (one source of truth).

    gpus is part of it: batch_size is per GPU, so the GPU count changes what is learned.
    """
    return {**config["train"], "image_size": config["cache"]["latents"]["image_size"]}


def log_file(name):
    return os.path.join(LOG_DIR, f"{name}.log")
