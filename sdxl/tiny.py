"""A deterministic tiny SDXL in diffusers layout, for tests and the demo pipeline.

Same architecture as SDXL base (dual CLIP, text_time conditioning, 3-level UNet, 4-level VAE),
with small widths (`sdxl.models.configs.TINY`) and seeded random weights, written exactly as
`StableDiffusionXLPipeline.save_pretrained` would so that diffusers loads the folder too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.models.configs import (
    MODEL_INDEX,
    SCHEDULER,
    TINY,
)
from sdxl.models.networks import MODEL_CLASSES
from sdxl.tiny_tokenizer import END, write_tokenizer
from sdxl.utils import atomic_path, atomic_write_text


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _save_component(folder: Path, name: str, config: dict, module: torch.nn.Module) -> None:
    if name in ("unet", "vae"):
        config = {**config, "_diffusers_version": "0.42.1"}
        weights = "diffusion_pytorch_model.safetensors"
    else:
        config = {**config, "transformers_version": "5.24.0"}
        weights = "model.safetensors"
    atomic_write_text(folder / name / "config.json", json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(folder / name / weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def write_random_sdxl(
    folder: str | Path,
    configs: dict = TINY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write an SDXL of `configs` with seeded random weights in diffusers layout.

    One network at a time (full size fits in memory), initialised in `dtype` on `device`;
    tokenizers are the tiny byte-level BPE, so text encoder vocab sizes must be TINY_VOCAB_SIZE.
    """
    folder = Path(folder)
    for k, (name, network) in enumerate(MODEL_CLASSES.items()):
        with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
            torch.manual_seed(seed + k)
            module = network(network.config_class.from_dict(configs[name]))
        _save_component(folder, name, configs[name], module)
        del module
    write_tokenizer(folder / "tokenizer", pad_token=END)
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    scheduler = dict(SCHEDULER, _diffusers_version="0.42.1")
    atomic_write_text(
        folder / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2)
    )
    index = dict(MODEL_INDEX, _diffusers_version="0.42.1")
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2))  # last: marks done
    return folder


def write_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write the complete tiny SDXL (weights, configs, tokenizers, scheduler) into `folder`."""
    return write_random_sdxl(folder, TINY, seed)


def default_tiny_dir() -> Path:
    """Where `builtin:tiny` lives: $SDXL_TINY_DIR, else the user cache."""
    import os

    root = os.environ.get("SDXL_TINY_DIR")
    if root:
        return Path(root)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "sdxl-pipeline" / "tiny-v1"


def ensure_tiny_sdxl(folder: str | Path | None = None) -> Path:
    """Return the tiny SDXL folder, writing it first if it is missing or incomplete."""
    folder = Path(folder) if folder is not None else default_tiny_dir()
    if not (folder / "model_index.json").exists():
        write_tiny_sdxl(folder)
    return folder
