"""LoRA on SDXL's two CLIP text encoders, as kohya trains it, and LoRA states with several parts.

kohya's sd-scripts (networks/lora.py) put a LoRA on every Linear of CLIPAttention and CLIPMLP:
`self_attn.{q,k,v,out}_proj` and `mlp.fc1` / `mlp.fc2` of each encoder layer, with the UNet's
rank and alpha. In our LoRA state (see `sdxl.lora`) a text encoder's modules are keyed by
diffusers' component name, `text_encoder.<path>` (CLIP-L; kohya's `lora_te1_`) and
`text_encoder_2.<path>` (bigG; `lora_te2_`), while UNet modules keep their bare paths, so
files without text-encoder parts read exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from sdxl.lora import LoRAConfig, apply_loras, inject_lora, load_lora_state_dict, lora_state_dict

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TEXT_TARGETS = (r"(?:^|\.)self_attn\.(?:q|k|v|out)_proj$", r"(?:^|\.)mlp\.fc[12]$")
# kohya's module names of those targets (the path with "." -> "_"), for reading its files.
_KOHYA_TEXT_NAME = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|"
                              r"self_attn_out_proj|mlp_fc[12])")  # fmt: skip


def text_lora_config(rank: int, alpha: float, dropout: float = 0.0) -> LoRAConfig:
    """kohya's text-encoder targets with the given rank, alpha and dropout."""
    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, target=TEXT_TARGETS)


def inject_text_lora(encoders: Sequence[nn.Module], config: LoRAConfig, seed: int) -> None:
    """LoRA (up = 0) into both encoders; lora_down drawn from `seed` + k, not the global RNG."""
    for k, encoder in enumerate(encoders):
        inject_lora(encoder, config, torch.Generator().manual_seed(seed + k + 1))


def component_of(path: str) -> str:
    """'unet', 'text_encoder' or 'text_encoder_2': which network a state key belongs to."""
    head = path.split(".", 1)[0]
    return head if head in TEXT_ENCODERS else "unet"


def split_components(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: its LoRA state with bare module paths}; components without modules left out."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part = component_of(key)
        out.setdefault(part, {})[key if part == "unet" else key.split(".", 1)[1]] = value
    return out


def prefixed(component: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A component's bare LoRA state keyed as in a combined state."""
    return dict(state) if component == "unet" else {f"{component}.{k}": v for k, v in state.items()}


def text_lora_state(encoders: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Both encoders' LoRA state, prefixed `text_encoder.` / `text_encoder_2.`."""
    out = {}
    for name, encoder in zip(TEXT_ENCODERS, encoders, strict=True):
        out.update(prefixed(name, lora_state_dict(encoder)))
    return out


def load_text_lora_state(encoders: Sequence[nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """Copy a prefixed text-encoder LoRA state into both encoders' LoRA layers (strict)."""
    parts = split_components(state)
    for name, encoder in zip(TEXT_ENCODERS, encoders, strict=True):
        load_lora_state_dict(encoder, parts.get(name, {}))


def apply_component_loras(
    components: Mapping[str, nn.Module],
    loras: Iterable[tuple[Mapping[str, torch.Tensor], float]],
    merge: bool = False,
) -> None:
    """`sdxl.lora.apply_loras` on each network (unet, text_encoder, text_encoder_2) that the
    combined LoRA states touch, each LoRA with its multiplier; a part for a network not in
    `components` is an error."""
    per: dict[str, list[tuple[dict[str, torch.Tensor], float]]] = {}
    for state, multiplier in loras:
        for name, part in split_components(state).items():
            per.setdefault(name, []).append((part, multiplier))
    missing = sorted(set(per) - set(components))
    if missing:
        raise ValueError(f"the LoRA has {missing} parts but only {sorted(components)} are loaded")
    for name, states in per.items():
        apply_loras(components[name], states, merge=merge)


def kohya_text_path(name: str) -> str | None:
    """`text_encoder[_2].<module path>` of a kohya lora_te1_/lora_te2_ module name (None: not
    one of kohya's CLIP targets, e.g. an SD 1.x `lora_te_` name)."""
    for component, prefix in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            m = _KOHYA_TEXT_NAME.fullmatch(name.removeprefix(prefix))
            if m is None:
                return None
            leaf = m[2].replace("self_attn_", "self_attn.", 1).replace("mlp_", "mlp.", 1)
            return f"{component}.text_model.encoder.layers.{m[1]}.{leaf}"
    return None


def kohya_text_name(path: str) -> str:
    """kohya's module name of a prefixed text-encoder path (inverse of kohya_text_path)."""
    component, rest = path.split(".", 1)
    return KOHYA_PREFIXES[component] + rest.replace(".", "_")
