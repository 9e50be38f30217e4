"""Optimizer over the fp32 LoRA parameters and the learning-rate schedule.

The schedule is a pure function of the optimizer step (1-based), so the first update already
uses warmup's first value and resuming needs nothing but the step count.
"""

from __future__ import annotations

import math

import torch

from sdxl.errors import UserError
from sdxl.train.config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with fp32 states, or bitsandbytes' 8-bit AdamW when asked.

    torch's AdamW is the fused kernel with a tensor learning rate: its step can be skipped on
    the device (`found_inf`, as GradScaler does) and, capturable on CUDA, it can be replayed in
    a CUDA graph. Where the build has no fused kernel for the device it is the plain AdamW.
    """
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
    )
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "--8_bit_adam needs bitsandbytes: install it with `uv pip install bitsandbytes` "
                "(CUDA only), or drop the flag to use AdamW"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    device = params[0].device
    lr = torch.tensor(cfg.learning_rate, device=device)
    try:
        return torch.optim.AdamW(params, fused=True, capturable=device.type == "cuda",
                                 **{**kwargs, "lr": lr})  # fmt: skip
    except RuntimeError:  # this build has no fused AdamW for the device
        return torch.optim.AdamW(params, **kwargs)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours an on-device `found_inf` flag (torch's fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then the schedule.

    The shapes are diffusers' (`diffusers.optimization`, which kohya uses too) at the same step:
    cosine_with_restarts restarts from the base rate lr_scheduler_num_cycles times (hard
    restarts), polynomial decays as (1 - progress) ** lr_scheduler_power to 0.
    """
    base, warm = cfg.learning_rate, cfg.warmup_steps
    if warm and step <= warm:
        return base * step / warm
    if cfg.lr_scheduler == "constant":
        return base
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    if cfg.lr_scheduler == "linear":
        return base * (1.0 - progress)
    if cfg.lr_scheduler == "polynomial":
        return base * (1.0 - progress) ** cfg.lr_scheduler_power
    if cfg.lr_scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return (
            base
            * 0.5
            * (1.0 + math.cos(math.pi * ((cfg.lr_scheduler_num_cycles * progress) % 1.0)))
        )
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor rate is filled in place (graphs read it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
