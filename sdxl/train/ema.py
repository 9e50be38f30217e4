"""Exponential moving average of the LoRA weights, kept in fp32 (bf16 would round updates away)."""

from __future__ import annotations

import torch


class LoRAEMA:
    """Shadow copies of the trainable LoRA tensors; `decay` per optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None) -> None:
        """One decay step; `skip` (0-d, 1.0 = the update was skipped) makes it a no-op on device."""
        # A tensor weight keeps the skip on the device: no host sync, CUDA-graph safe.
        weight = 1 - self.decay if skip is None else (1 - skip) * (1 - self.decay)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for dst, src in zip(self.shadow, state["shadow"], strict=True):
            dst.copy_(src)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and shadow weights (call twice to restore); used to export the EMA LoRA."""
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
