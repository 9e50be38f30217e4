"""LoRA files to and from our LoRA state: a module per format; `load_lora_file` detects which.

Our state (`sdxl.lora.lora_state_dict`) is keyed by diffusers module path: `<path>.lora_down.weight`
[r, in(, k, k)], `<path>.lora_up.weight` [out, r(, 1, 1)], `<path>.alpha`; delta = alpha/r up@down.

* `kohya`: kohya `.safetensors` with SGM UNet names (what ComfyUI, A1111 and diffusers load);
* `seed`: the seed project's `.pt`;
* `peft`: diffusers/PEFT `pytorch_lora_weights.safetensors`;
* `layout`: the diffusers <-> SGM UNet module names, for the block layout of a UNet's config.

Each format has one pure conversion pair (state <-> tensors) and a writer.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdxl.lora import check_lora_state, split_lora_state
from sdxl.lora_formats.kohya import kohya_to_state
from sdxl.lora_formats.layout import SDXL_LAYOUT, UNetLayout, diffusers_to_sgm
from sdxl.lora_formats.peft import is_peft_key, peft_to_state
from sdxl.lora_formats.seed import seed_to_state
from sdxl.lora_formats.state import with_alphas
from sdxl.text_lora import component_of, kohya_text_path

__all__ = ["LoRAFileError", "LoRAInfo", "load_lora_file"]


@dataclass(frozen=True)
class LoRAInfo:
    """What a LoRA file held besides the tensors."""

    format: str  # "kohya", "seed", "peft" or "sdxl" (our state saved as is)
    ranks: dict[str, int]
    alphas: dict[str, float]
    metadata: dict[str, str]
    ignored: tuple[str, ...] = ()  # text-encoder modules in the file, not applied

    @property
    def rank(self) -> int:
        """The most common rank."""
        return Counter(self.ranks.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        """The most common alpha."""
        return Counter(self.alphas.values()).most_common(1)[0][0]


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used for this UNet (the message names the file)."""


def load_lora_file(
    path: str | os.PathLike, unet: nn.Module | None = None, *, text_encoders: bool = False
) -> tuple[dict[str, torch.Tensor], LoRAInfo]:
    """Read a kohya, seed .pt, diffusers/PEFT or our own LoRA file into our state (format detected).

    With `unet`, its config gives the block layout and every UNet LoRA module is checked to
    exist with matching shapes; without, the SDXL layout is assumed. Text-encoder parts are
    skipped with a warning, unless `text_encoders`: then they are in the state too, keyed
    `text_encoder.<path>` / `text_encoder_2.<path>` (see `sdxl.text_lora.apply_component_loras`),
    and a file with only those is usable. Files for other architectures raise LoRAFileError
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        obj, metadata = _read(path)
        _check_architecture(metadata)
        layout = UNetLayout.from_config(unet.config) if unet is not None else SDXL_LAYOUT
        state, fmt, ignored = _to_state(obj, metadata, layout)
        state, ignored = _text_parts(state, ignored, text_encoders)
        if not state:
            what = (
                f"only text-encoder LoRA weights ({len(ignored)} modules)" if ignored else "no LoRA"
            )
            raise ValueError(f"it has {what}; only UNet LoRAs are applied")
        if unet is not None:
            check_lora_state(unet, {k: v for k, v in state.items() if component_of(k) == "unet"})
    except (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise LoRAFileError(f"{path}: not a usable SDXL UNet LoRA: {e}") from e
    if ignored:
        why = " (not CLIP attention/MLP Linears)" if text_encoders else "; only the UNet is applied"
        warnings.warn(f"{path}: skipping {len(ignored)} text-encoder LoRA modules{why}",
                      stacklevel=2)  # fmt: skip
    weights = split_lora_state(state)
    ranks = {p: w.rank for p, w in weights.items()}
    alphas = {p: w.alpha for p, w in weights.items()}
    return state, LoRAInfo(fmt, ranks, alphas, dict(metadata), ignored)


def _text_parts(
    state: dict[str, torch.Tensor], ignored: tuple[str, ...], keep: bool
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state with its text-encoder parts kept or dropped; the text modules not applied."""
    if not keep:
        return {k: v for k, v in state.items() if component_of(k) == "unet"}, ignored
    # Names of modules not converted (kohya: not CLIP q/k/v/out_proj or fc1/fc2, e.g. SD 1.x
    # lora_te_; PEFT: an older layout) stay out.
    modules = set(split_lora_state(state))
    paths = {n: kohya_text_path(n) if n.startswith("lora_te") else n for n in ignored}
    return state, tuple(n for n, path in paths.items() if path not in modules)


def _read(path: Path) -> tuple[Mapping, dict[str, str]]:
    """Tensors (or the seed's checkpoint dict) and the safetensors header metadata."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read the safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never
        raise ValueError(
            "it is a pickle holding objects other than tensors, refused because loading it "
            "could run code; use a .safetensors LoRA"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict, found a {type(obj).__name__}")
    return obj, {}


def _check_architecture(metadata: Mapping[str, str]) -> None:
    """Reject files whose header says they are for another model."""
    base = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if base and not base.startswith("sdxl"):
        raise ValueError(f"it was trained for {base!r} (ss_base_model_version), not SDXL")
    if arch and not arch.startswith("stable-diffusion-xl"):
        raise ValueError(f"it is for {arch!r} (modelspec.architecture), not SDXL")
    if metadata.get("ss_v2") == "True":
        raise ValueError("it was trained for Stable Diffusion 2.x (ss_v2), not SDXL")


def _to_state(
    obj: Mapping, metadata: Mapping[str, str], layout: UNetLayout
) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """(our state, format name, skipped text-encoder modules) for any supported set of keys."""
    if "lora_state_dict" in obj:
        return seed_to_state(obj), "seed", ()
    keys = list(obj)
    if any(not isinstance(obj[k], torch.Tensor) for k in keys):
        raise ValueError("it holds non-tensor entries and no 'lora_state_dict'")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        state, ignored = kohya_to_state(obj, layout)
        return state, "kohya", ignored
    if any(".lora_layer.lora_" in k for k in keys):
        raise ValueError("it has bare seed lora_layer tensors without the seed's lora_alpha config")
    if any(k.endswith(".lora_down.weight") for k in keys):
        state = with_alphas(dict(obj))
        _check_unet_modules(state, layout)
        return state, "sdxl", ()
    if any(is_peft_key(k) for k in keys):
        state, ignored = peft_to_state(obj, metadata)
        _check_unet_modules(state, layout)
        return state, "peft", ignored
    raise ValueError(f"its keys match no known LoRA format (first keys: {keys[:3]})")


def _check_unet_modules(state: Mapping[str, torch.Tensor], layout: UNetLayout) -> None:
    """Raise ValueError unless every UNet module of `state` is a module of this layout."""
    for path in split_lora_state(state):
        if component_of(path) == "unet":
            diffusers_to_sgm(path, layout)  # raises naming the module
