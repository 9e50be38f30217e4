"""diffusers/PEFT `pytorch_lora_weights.safetensors` (`save_lora_weights`, `load_lora_weights`).

Keys `unet.<path>.lora_A.weight` / `.lora_B.weight` (older: `lora.down`/`lora.up`, attention
processor `to_q_lora`); alpha in the `lora_adapter_metadata` header (PEFT LoraConfig JSON), else r.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from sdxl.lora import split_lora_state
from sdxl.lora_formats.state import most_common_rank_alpha, to_cpu
from sdxl.text_lora import component_of
from sdxl.utils import atomic_path

_PEFT_KEY = re.compile(
    r"(?P<path>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<du>down|up)\.weight|(?P<alpha>alpha))"
)
_PEFT_PROCESSOR_KEY = re.compile(
    r"(?P<pre>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<du>down|up)\.weight"
)
_PEFT_TEXT = ("text_encoder.", "text_encoder_2.")
_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def is_peft_key(key: str) -> bool:
    """Whether `key` is a diffusers/PEFT LoRA tensor name (any of the layouts read here)."""
    return bool(_PEFT_KEY.fullmatch(key) or _PEFT_PROCESSOR_KEY.fullmatch(key))


def state_to_peft(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers `save_lora_weights` tensors (unet.<path>.lora_A/B.weight) and header metadata."""
    weights = split_lora_state(state)
    if any(w.magnitude is not None for w in weights.values()):
        raise ValueError("DoRA LoRAs are written as kohya .safetensors (dora_scale), not as PEFT")
    tensors = {}
    for path, w in weights.items():
        tensors[f"unet.{path}.lora_A.weight"] = to_cpu(w.down, None)
        tensors[f"unet.{path}.lora_B.weight"] = to_cpu(w.up, None)
    rank, alpha = most_common_rank_alpha(list(weights.values()))
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {p: w.rank for p, w in weights.items() if w.rank != rank},
        "alpha_pattern": {p: w.alpha for p, w in weights.items() if w.alpha != alpha},
        "target_modules": sorted(weights),
    }
    packed = {f"unet.{k}": v for k, v in config.items()}
    return tensors, {
        "format": "pt",
        _ADAPTER_METADATA: json.dumps(packed, indent=2, sort_keys=True),
    }


def peft_to_state(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Our state from diffusers/PEFT tensors (+ header); also the text-encoder module names.

    Text-encoder modules in PEFT's layout are in the state as `text_encoder[_2].<path>`.
    """
    state, text, alphas = {}, set(), {}
    for key, value in tensors.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith(_PEFT_TEXT):
            component, rest = key.split(".", 1)
            try:
                path, part = _peft_key(rest)
            except ValueError:  # an older layout (lora_linear_layer): not applied
                text.add(key.rsplit(".lora", 1)[0])
                continue
            # transformers >= 5 names a bare CLIPTextModel's modules without `text_model.`
            path = f"{component}.{path if path.startswith('text_') else 'text_model.' + path}"
            text.add(path)
        else:
            path, part = _peft_key(key.removeprefix("unet."))
        if part == "alpha":
            alphas[path] = float(value)
        else:
            state[f"{path}.{part}"] = value
    configs = {"unet": _peft_config(metadata)}
    for path, w in split_lora_state(state).items():
        part = component_of(path)
        if part not in configs:
            configs[part] = _peft_text_config(metadata, part)
        config, bare = configs[part], path if part == "unet" else path.split(".", 1)[1]
        alpha = alphas.get(
            path, _pattern_value(config, "alpha_pattern", bare, config.get("lora_alpha"))
        )
        alpha = float(alpha) if alpha is not None else float(w.rank)
        if config.get("use_rslora"):
            alpha *= w.rank**0.5  # rsLoRA scales by alpha / sqrt(r)
        state[f"{path}.alpha"] = torch.tensor(alpha)
    return state, tuple(sorted(text))


def _peft_key(key: str) -> tuple[str, str]:
    """(module path, our suffix) of one PEFT/diffusers LoRA key."""
    m = _PEFT_PROCESSOR_KEY.fullmatch(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['pre']}.{proj}", f"lora_{m['du']}.weight"
    m = _PEFT_KEY.fullmatch(key)
    if not m:
        raise ValueError(
            f"unsupported tensor {key!r}: expected <module>.lora_A.weight / lora_B.weight "
            "(DoRA and other PEFT variants are not supported)"
        )
    if m["alpha"]:
        return m["path"], "alpha"
    down = m["ab"] == "A" or m["du"] == "down"
    return m["path"], "lora_down.weight" if down else "lora_up.weight"


def _peft_config(metadata: Mapping[str, str] | None) -> dict:
    """The UNet's PEFT LoraConfig fields from diffusers' lora_adapter_metadata header, if any."""
    raw = (metadata or {}).get(_ADAPTER_METADATA)
    if not raw:
        return {}
    packed = json.loads(raw)
    config = {k.removeprefix("unet."): v for k, v in packed.items() if not k.startswith(_PEFT_TEXT)}
    if config.get("use_dora"):
        raise ValueError("DoRA LoRAs (use_dora) are not supported")
    return config


def _peft_text_config(metadata: Mapping[str, str] | None, component: str) -> dict:
    """A text encoder's PEFT LoraConfig fields (`<component>.` keys of the adapter metadata)."""
    packed = json.loads((metadata or {}).get(_ADAPTER_METADATA) or "{}")
    return {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(f"{component}.")}


def _pattern_value(config: Mapping, key: str, path: str, default):
    """PEFT's rank/alpha_pattern lookup: first pattern matching the end of the module path."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def save_peft(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> None:
    """Write diffusers' pytorch_lora_weights.safetensors layout (atomic), alphas in the header."""
    tensors, header = state_to_peft(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
