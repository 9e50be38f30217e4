"""The CLIP model of the CLIP score: a Hub repo, a local folder, or `builtin:tiny-clip`.

transformers' CLIPModel and CLIPProcessor, called as torchmetrics' `CLIPScore` calls them, so
the embeddings (and the score) are the same for the same model, images and prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch

from sdxl.errors import UserError
from sdxl.evaluate.inception import cache_dir
from sdxl.utils import atomic_write_text

TINY_CLIP = "builtin:tiny-clip"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_HUB_FILES = ["*.json", "*.txt", "model.safetensors"]  # config, tokenizer, processor, weights


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random CLIP (32 px images, the tiny SDXL tokenizer), saved as save_pretrained does."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sdxl.models.configs import TINY_VOCAB_SIZE
    from sdxl.tiny_tokenizer import write_tokenizer

    folder = Path(folder)
    text = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=TINY_VOCAB_SIZE - 2, eos_token_id=TINY_VOCAB_SIZE - 1,
                pad_token_id=TINY_VOCAB_SIZE - 1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)  # transformers initialises from the global generator
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)  # fmt: skip
    write_tokenizer(folder)
    atomic_write_text(folder / "tiny-clip.json", json.dumps({"seed": seed}) + "\n")  # complete
    return folder


def tiny_clip_dir() -> Path:
    """Where `builtin:tiny-clip` lives (written on first use)."""
    folder = cache_dir() / "tiny-clip-v1"
    if (folder / "tiny-clip.json").exists():
        return folder
    # Written beside and renamed: concurrent jobs never see (or load) a half-written folder.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-clip-", dir=folder.parent))
    try:
        write_tiny_clip(tmp)
        with contextlib.suppress(OSError):  # another job got there first: same content
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def clip_folder(name: str) -> Path:
    """The local folder of CLIP model `name`, downloading a Hub repo on first use."""
    if name == TINY_CLIP:
        return tiny_clip_dir()
    if Path(name).is_dir():
        return Path(name)
    if Path(name).is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise UserError(f"clip model {name!r}: no such folder and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    from sdxl.hub import check_reachable, hub_call, hub_offline

    cached = partial(snapshot_download, name, allow_patterns=_HUB_FILES, local_files_only=True)
    try:
        return Path(cached())
    except Exception:  # not in the Hugging Face cache yet (LocalEntryNotFoundError, ...)
        if hub_offline():
            return Path(hub_call(cached, name))  # the one-line offline HubError
    check_reachable(name)
    token = os.environ.get("HF_TOKEN") or None
    fetch = partial(snapshot_download, name, allow_patterns=_HUB_FILES, token=token)
    return Path(hub_call(fetch, name, retries=5))


def load_clip(name: str, device: str | torch.device = "cpu"):
    """(CLIPModel in eval mode on `device`, CLIPProcessor) of `name`."""
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_folder(name)
    model = CLIPModel.from_pretrained(folder).requires_grad_(False).eval().to(device)
    return model, CLIPProcessor.from_pretrained(folder)


def _tensor(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def image_embeddings(model, processor, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images -> (B, E) projected image embeddings (not normalised)."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    device = next(model.parameters()).device
    return _tensor(model.get_image_features(pixel_values=pixels.to(device))).float()


@torch.inference_mode()
def text_embeddings(model, processor, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (B, E) projected text embeddings; long prompts are cut to the model's length
    keeping their end token (torchmetrics cuts off the end token instead)."""
    limit = model.config.text_config.max_position_embeddings
    tokens = processor(text=prompts, return_tensors="pt", padding=True, truncation=True,
                       max_length=limit)  # fmt: skip
    device = next(model.parameters()).device
    out = model.get_text_features(
        tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    )
    return _tensor(out).float()
