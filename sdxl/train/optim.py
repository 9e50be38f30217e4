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
    """The optimizer `cfg.optimizer` names over the fp32 LoRA parameters, with `optimizer_args`.

    adamw is torch's fused kernel with a tensor learning rate: its step can be skipped on the
    device (`found_inf`, as GradScaler does) and, capturable on CUDA, it can be replayed in a
    CUDA graph (where the build has no fused kernel for the device, the plain AdamW). The others
    come from their usual packages (bitsandbytes, prodigyopt, lion-pytorch; torch's Adafactor),
    take the shared settings that apply to them, and skip a non-finite step with one host sync.
    """
    name = "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer
    extra = parse_optimizer_args(cfg.optimizer_args)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    common = {"lr": cfg.learning_rate, "weight_decay": cfg.adam_weight_decay}
    if name == "adamw":
        device = _first(params).device
        plain = {**common, "betas": betas, "eps": cfg.adam_epsilon}
        fast = {"lr": torch.tensor(cfg.learning_rate, device=device), "fused": True,
                "capturable": device.type == "cuda"}  # fmt: skip
        try:
            return _build("adamw", torch.optim.AdamW, params, **{**plain, **fast, **extra})
        except RuntimeError:  # this build has no fused AdamW for the device
            return _build("adamw", torch.optim.AdamW, params, **{**plain, **extra})
    if name == "adafactor":
        return _build(name, torch.optim.Adafactor, params, **common, **extra)
    cls = _import_optimizer(name)
    kwargs = {**common, "betas": betas, **({"eps": cfg.adam_epsilon} if name != "lion" else {})}
    return _build(name, cls, params, **kwargs, **extra)


def param_groups(unet: list[torch.nn.Parameter], text: list[torch.nn.Parameter],
                 cfg: TrainConfig) -> list[dict]:  # fmt: skip
    """The UNet LoRA at --unet_lr and the text encoders' at --text_encoder_lr (each defaulting to
    --learning_rate); `base_lr` is what the schedule scales in `set_group_lrs`."""
    groups = [{"params": unet, "base_lr": cfg.unet_lr or cfg.learning_rate}]
    if text:
        groups.append({"params": text, "base_lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups


def _first(params) -> torch.nn.Parameter:
    """The first parameter of a parameter list or of a list of param groups."""
    first = params[0]
    return first["params"][0] if isinstance(first, dict) else first


# name -> (module, class, package to install), for the optimizers of other packages.
_PACKAGES = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}


def _import_optimizer(name: str) -> type:
    import importlib

    module, cls, package = _PACKAGES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(
            f"--optimizer {name} needs {package}: install it with `uv sync --extra optimizers` "
            f"(or `uv pip install {package.split()[0]}`), or choose another --optimizer"
        ) from None


def _build(name: str, cls: type, params, **kwargs) -> torch.optim.Optimizer:
    """cls(params, **kwargs); an argument the optimizer does not take is one clear error."""
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise UserError(f"--optimizer {name}: {err}; check --optimizer_args") from None


def parse_optimizer_args(args: tuple[str, ...] | list[str]) -> dict:
    """kohya's `key=value` optimizer arguments; values are Python literals, else strings."""
    import ast

    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--optimizer_args {arg!r}: write key=value, e.g. d_coef=2.0")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours an on-device `found_inf` flag (torch's fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def lr_at(step: int, cfg: TrainConfig, total_steps: int, base: float | None = None) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then the schedule.

    The shapes are diffusers' (`diffusers.optimization`, which kohya uses too) at the same step:
    cosine_with_restarts restarts from the base rate lr_scheduler_num_cycles times (hard
    restarts), polynomial decays as (1 - progress) ** lr_scheduler_power to 0. `base`: the rate
    the schedule scales (default --learning_rate).
    """
    base, warm = base or cfg.learning_rate, cfg.warmup_steps
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


def set_group_lrs(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                  total_steps: int) -> None:  # fmt: skip
    """Each group's rate at `step`: the schedule applied to its `base_lr` (see param_groups); a
    tensor rate is filled in place (CUDA graphs read it there)."""
    for group in optimizer.param_groups:
        lr = lr_at(step, cfg, total_steps, group.get("base_lr"))
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
