"""The seed project's LoRA `.pt`, which its generate_images.py loads.

{"lora_state_dict": {"<path>.lora_layer.lora_A": [in, r], "<path>.lora_layer.lora_B": [r, out]},
"config": {"lora_rank", "lora_alpha", ...}, ...}: one scale alpha/r for every module, Linear only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from sdxl.lora import LoRAWeights, split_lora_state
from sdxl.lora_formats.state import most_common_rank_alpha, to_cpu
from sdxl.utils import atomic_path


def state_to_seed(state: Mapping[str, torch.Tensor]) -> dict:
    """The seed's LoRA checkpoint layout (without optimizer), which its generate_images.py loads.

    The seed uses one alpha/r for all modules: other scales are folded into lora_B.
    """
    weights = split_lora_state(state)
    if any(w.down.ndim != 2 for w in weights.values()):
        raise ValueError("the seed's .pt format holds Linear LoRAs only; save conv LoRAs as kohya")
    rank, alpha = most_common_rank_alpha(list(weights.values()))
    scale = alpha / rank
    tensors = {}
    for path, w in weights.items():
        tensors[f"{path}.lora_layer.lora_A"] = to_cpu(w.down, torch.float32).T.contiguous()
        up = w.up.float() * (w.alpha / w.rank / scale)
        tensors[f"{path}.lora_layer.lora_B"] = to_cpu(up, torch.float32).T.contiguous()
        if w.magnitude is not None:  # DoRA: an addition the seed's own loader does not know
            tensors[f"{path}.lora_layer.dora_scale"] = to_cpu(w.magnitude, torch.float32)
    config = {"lora_rank": rank, "lora_alpha": alpha, "lora_target_mode": _seed_mode(weights)}
    return {
        "lora_state_dict": tensors,
        "config": config,
        "checkpoint_version": "1.0",
        "is_lora_checkpoint": True,
    }


def _seed_mode(weights: Mapping[str, LoRAWeights]) -> str:
    """The seed's --lora_target_mode that covers these modules."""
    if all(re.search(r"attn[12]\.to_[qkv]$", p) for p in weights):
        return "attention"
    if all(re.search(r"attn[12]\.(to_[qkv]|to_out\.0)$", p) for p in weights):
        return "attention_out"
    return "all"


def seed_to_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Our state from a seed .pt dict (training checkpoint or extract_lora_weights.py output)."""
    tensors = checkpoint.get("lora_state_dict")
    config = checkpoint.get("config") or checkpoint.get("metadata") or {}
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("no 'lora_state_dict' with tensors in this seed checkpoint")
    if "lora_alpha" not in config or "lora_rank" not in config:
        raise ValueError("the seed checkpoint has no config with lora_rank and lora_alpha")
    scale = float(config["lora_alpha"]) / int(config["lora_rank"])
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_layer\.(?:lora_([AB])|(dora_scale))", key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in the seed's lora_state_dict")
        parts.setdefault(m[1], {})[m[2] or m[3]] = value
    state = {}
    for path, p in parts.items():
        if set(p) - {"dora_scale"} != {"A", "B"}:
            raise ValueError(f"seed LoRA module {path!r} needs both lora_A and lora_B")
        down, up = p["A"].float().T.contiguous(), p["B"].float().T.contiguous()  # (r, in), (out, r)
        state[f"{path}.lora_down.weight"], state[f"{path}.lora_up.weight"] = down, up
        state[f"{path}.alpha"] = torch.tensor(scale * down.shape[0])
        if "dora_scale" in p:
            state[f"{path}.dora_scale"] = p["dora_scale"]
    return state


def save_seed_pt(path: str | os.PathLike, state: Mapping[str, torch.Tensor], **extra) -> None:
    """Write the seed's LoRA .pt (weights only; `extra` adds top-level entries such as step)."""
    with atomic_path(path) as tmp:
        torch.save({**state_to_seed(state), **extra}, tmp)
