"""Helpers on our LoRA state that every file format shares."""

from __future__ import annotations

from collections import Counter

import torch

from sdxl.lora import LoRAWeights, split_lora_state
from sdxl.utils import to_dtype


def with_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise: every module gets an explicit fp32 alpha (missing = rank)."""
    out = {}
    for path, w in split_lora_state(state).items():
        out[f"{path}.lora_down.weight"] = w.down
        out[f"{path}.lora_up.weight"] = w.up
        out[f"{path}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.magnitude is not None:
            out[f"{path}.dora_scale"] = w.magnitude
    return out


def to_cpu(t: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    """A detached, contiguous CPU copy for writing (in `dtype`, default its own)."""
    dtype = to_dtype(dtype) if dtype is not None else t.dtype
    return t.detach().to("cpu", dtype).contiguous()


def most_common_rank_alpha(weights: list[LoRAWeights]) -> tuple[int, float]:
    """The (rank, alpha) most modules have: what single-valued headers and configs record."""
    return Counter((w.rank, w.alpha) for w in weights).most_common(1)[0][0]
