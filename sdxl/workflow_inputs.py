"""What each rule of the workflow reads from the config: its input files and its params.

The params of a rule are what its results depend on, so they decide what an edit of
config.yaml reruns (README: "What an edit reruns"); every function here says what it leaves out
and why. Imported when the workflow is parsed: stdlib and light sdxl modules only (no torch,
PIL or pandas), as every job and every dry run parses it.
"""

from __future__ import annotations

import os

from sdxl.dataset_config import caption_settings
from sdxl.evaluate.files import image_paths
from sdxl.train.config import RUNTIME_SETTINGS, VALIDATION_SETTINGS

# What sdxl.data.dataset.scan_dataset reads; tests/test_workflow.py checks that both agree.
DATA_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".txt")


def data_folders(config: dict) -> list[tuple[str, str, tuple[str, ...]]]:
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


def dataset_files(config: dict) -> list[str]:
    """Every image and caption file of the dataset: adding or editing one reruns validation."""
    found = []
    for where, root, suffixes in data_folders(config):
        if not os.path.isdir(root):
            raise ValueError(f"{where}: {root} is not a folder; point it at your images")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [
                os.path.join(folder, name)
                for name in sorted(files)
                if not name.startswith(".") and name.lower().endswith(suffixes)
            ]
    return found


def data_settings(config: dict) -> dict:
    """What the validated items depend on: data.subsets' caption rules, not how training uses
    the items (repeats, is_reg, shuffling, dropout, flips: train_settings has those)."""
    return {**config["data"], "subsets": caption_settings(config["data"]["subsets"])}


def train_settings(config: dict) -> dict:
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


def validation_settings(config: dict) -> dict:
    """What the validation grids depend on besides the LoRA files."""
    train = config["train"]
    return {
        **{k: train[k] for k in VALIDATION_SETTINGS},
        "seed": train["seed"],
        "image_size": config["cache"]["latents"]["image_size"],
    }


def generation_settings(config: dict) -> dict:
    """What every image depends on (its own index aside); not the image count (each job makes a
    fixed range) nor speed-only settings (compile, channels_last: read from the config), nor
    how the dataset is packed (output_format, webdataset_shard_size: the pack_webdataset rule's).
    """
    skip = {"num_images", "images_per_shard", "compile", "channels_last",
            "output_format", "webdataset_shard_size"}  # fmt: skip
    return {k: v for k, v in config["generate"].items() if k not in skip}


def reference_dir_files(config: dict) -> list[str]:
    """The images under evaluate.reference_dir, in the order the evaluate_reference jobs read
    them (sdxl/evaluate/files.py); none without a reference_dir."""
    root = config["evaluate"]["reference_dir"]
    if not root:
        return []
    if not os.path.isdir(root):
        raise ValueError(f"evaluate.reference_dir: {root} is not a folder of images")
    return [str(p) for p in image_paths(root)]


def reference_count(config: dict, reference_files: list[str]) -> int:
    """How many reference images there may be, known when the workflow is parsed: the images
    under evaluate.reference_dir (`reference_files`), else the training dataset's image files
    (items that validation drops leave the last reference shards short, or empty)."""
    if not config["evaluate"]["reference_dir"]:
        images = DATA_SUFFIXES[:-1]  # not the caption files, whatever their extension
        return sum(p.lower().endswith(images) for p in dataset_files(config))
    return len(reference_files)
