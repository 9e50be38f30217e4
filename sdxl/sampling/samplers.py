"""Samplers that reproduce diffusers' schedulers, as pure steps over a denoiser (k-diffusion style).

A denoiser D(x, level) -> x0 works on the variance-exploding scale x = x0 + sigma * eps (Karras
et al. 2022, arXiv:2206.00364); `level` bundles the noise level sigma with the timestep the
network is called at, both device tensors. The eps/v-network is wrapped into that denoiser once,
by `denoiser` (k-diffusion's external.py). A sampler step is a pure update
(D, x, previous x0, step row) -> (x, x0); `plan` lays out one run of a named sampler as data:
the update, its per-step tables on the latent's device (so a step never waits on the host) and
the pre-drawn ancestral noise. Nothing keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from sdxl.noise_schedule import PREDICTION_TYPES, SchedulerConfig
from sdxl.sampling.schedules import ddim_schedule, dpm_schedule, euler_schedule


class NoiseLevel(NamedTuple):
    """One step's noise level as the sampler sees it (sigma) and as the network does (t)."""

    sigma: Tensor  # 0-d fp32, x = x0 + sigma * eps
    t: Tensor  # 0-d fp32, the (maybe fractional) training timestep of sigma


Model = Callable[[Tensor, Tensor], Tensor]  # (model input, timestep) -> raw eps or v prediction
Denoiser = Callable[[Tensor, NoiseLevel], Tensor]  # (x, level) -> x0
Tables = dict[str, Tensor]  # per-step schedule values, one row per step (or one step's row)
Update = Callable[[Denoiser, Tensor, Tensor, Tables], tuple[Tensor, Tensor]]  # -> (x, x0)


# --------------------------------------------------------------------------- denoiser


def denoiser(model: Model, prediction_type: str) -> Denoiser:
    """Wrap an eps/v-network as D(x, level) -> x0 for x = x0 + sigma * eps (k-diffusion's external.py).

    The network sees x / sqrt(sigma^2 + 1), the variance-preserving input diffusers'
    scale_model_input gives it, at the level's timestep; its output is cast to fp32.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )

    def denoise(x: Tensor, level: NoiseLevel) -> Tensor:
        sigma = level.sigma
        out = model(x / (sigma**2 + 1) ** 0.5, level.t).float()
        if prediction_type == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)

    return denoise


def clipped(denoise: Denoiser, limit: float) -> Denoiser:
    """D with x0 clamped to [-limit, limit] (diffusers' clip_sample)."""
    return lambda x, level: denoise(x, level).clamp(-limit, limit)


# --------------------------------------------------------------------------- updates

# Each update is one sampler step as a pure function (D, x, previous x0, step row) -> (x, x0).
# The row holds this step's schedule values as 0-d device tensors (and its pre-drawn noise), so
# a step never reads the host: the loop can be compiled and captured as a CUDA graph.


def euler_update(denoise: Denoiser, x: Tensor, _prev: Tensor, s: Tables) -> tuple[Tensor, Tensor]:
    """Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma (arXiv:2206.00364 alg. 1)."""
    sigma = s["sigma"]
    x0 = denoise(x, NoiseLevel(sigma, s["t"]))
    d = (x - x0) / sigma
    return x + d * (s["sigma_next"] - sigma), x0


def ancestral_update(
    denoise: Denoiser, x: Tensor, _prev: Tensor, s: Tables
) -> tuple[Tensor, Tensor]:
    """Euler down to sigma_down, then the step's noise up to sigma_next (k-diffusion, eta=1).

    In this scale one DDPM posterior sample (Ho et al. 2020) is exactly this step.
    """
    sigma, sigma_next = s["sigma"], s["sigma_next"]
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0) ** 0.5
    x0 = denoise(x, NoiseLevel(sigma, s["t"]))
    d = (x - x0) / sigma
    x = x + d * (sigma_down - sigma)
    return x + s["noise"] * sigma_up, x0


def ddim_update(
    denoise: Denoiser, x: Tensor, _prev: Tensor, s: Tables, *, clip: float | None = None
) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM (eta=0, Song et al. 2020, arXiv:2010.02502): jump along the predicted eps.

    x stays in the variance-preserving scale, as in diffusers, because a step's target level
    need not be the next step's start level (see `ddim_schedule`); eps is the unclipped one.
    """
    sigma, sigma_next = s["sigma"], s["sigma_next"]
    x_ve = x * (sigma**2 + 1) ** 0.5
    x0 = denoise(x_ve, NoiseLevel(sigma, s["t"]))
    eps = (x_ve - x0) / sigma
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return (x0 + sigma_next * eps) / (sigma_next**2 + 1) ** 0.5, x0


def dpmpp_2m_update(denoise: Denoiser, x: Tensor, prev: Tensor, s: Tables) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) in lambda = -log sigma.

    First order where the row's `second_order` is false (the first step, which has no history,
    and the last one, into sigma = 0 as diffusers' final_sigmas_type="zero"); `torch.where`
    picks the branch on the device, so the step has no Python branch on the step index.
    """
    sigma, sigma_next = s["sigma"], s["sigma_next"]
    x0 = denoise(x, NoiseLevel(sigma, s["t"]))
    h = sigma.log() - sigma_next.log()  # +inf into sigma = 0, where the update gives x0
    r = (s["sigma_prev"].log() - sigma.log()) / h  # 0 on first-order rows: never selected
    second = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
    d = torch.where(s["second_order"], second, x0)
    return (sigma_next / sigma) * x - torch.expm1(-h) * d, x0


# --------------------------------------------------------------------------- plans + registry


@dataclass(frozen=True, eq=False)
class Plan:
    """One sampling run laid out as data: per-step tables, the pure update, the x0 denoiser.

    tables[k] has one row per step (sigma, sigma_next, t, and per sampler sigma_prev,
    second_order or the pre-drawn noise (N, B, C, H, W)); all live on the latent's device.
    """

    update: Update
    tables: Tables
    init_scale: Tensor  # 0-d: the unit noise is multiplied by it (diffusers' init_noise_sigma)
    prediction_type: str
    clip_x0: float | None = None  # clamp every x0 (DDPM's clip_sample)

    @property
    def num_steps(self) -> int:
        return self.tables["t"].shape[0]

    def denoiser(self, model: Model) -> Denoiser:
        """The x0 denoiser this plan's updates call, around the eps/v network `model`."""
        d = denoiser(model, self.prediction_type)
        return clipped(d, self.clip_x0) if self.clip_x0 is not None else d


def predraw_noise(
    generators: Sequence[torch.Generator] | None, like: Tensor, draw: Sequence[bool]
) -> Tensor:
    """Unit noise (N, B, C, H, W) for the steps where draw[i], zeros elsewhere, drawn up front.

    Image b's rows come from generators[b] in step order, exactly the draws diffusers'
    randn_tensor makes during its loop, so images match it and depend only on their own seed.
    Without generators the rows come from the device's default generator.
    """
    home = generators[0].device if generators else like.device  # one copy to `like` at the end
    shape = (1, *like.shape[1:])
    rows = []
    for wanted in draw:
        if not wanted:
            rows.append(torch.zeros(like.shape, device=home, dtype=torch.float32))
        elif generators is None:
            rows.append(torch.randn(like.shape, device=home, dtype=torch.float32))
        else:
            rows.append(torch.cat([torch.randn(shape, generator=g, device=g.device,
                                               dtype=torch.float32) for g in generators]))  # fmt: skip
    return torch.stack(rows).to(like.device)


def _tables(device: torch.device, **arrays: np.ndarray) -> Tables:
    """fp32 device tensors from host schedule arrays (one copy per call, none in the loop)."""
    return {
        name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        for name, a in arrays.items()
    }


def _init_scale(sigma_max: Tensor, variance_preserving: bool) -> Tensor:
    """diffusers' init_noise_sigma on our scale: sqrt(sigma^2 + 1) unless it starts at sigma itself."""
    return (sigma_max**2 + 1) ** 0.5 if variance_preserving else sigma_max


def _euler_tables(cfg: SchedulerConfig, num_steps: int, device, **kw) -> Tables:
    sigmas, timesteps = euler_schedule(cfg, num_steps, **kw)
    return _tables(device, sigma=sigmas[:-1], sigma_next=sigmas[1:], t=timesteps)


def _plan_euler(config, num_steps, noise, generators, *, karras: bool) -> Plan:
    """diffusers EulerDiscreteScheduler (use_karras_sigmas=karras)."""
    cfg = SchedulerConfig.from_dict(config, "euler")
    tables = _euler_tables(cfg, num_steps, noise.device, karras=karras)
    scale = _init_scale(tables["sigma"][0], cfg.timestep_spacing == "leading")
    return Plan(euler_update, tables, scale, cfg.prediction_type)


def _plan_euler_a(config, num_steps, noise, generators) -> Plan:
    """diffusers EulerAncestralDiscreteScheduler (it has no Karras option)."""
    cfg = SchedulerConfig.from_dict(config, "euler_a")
    tables = _euler_tables(cfg, num_steps, noise.device)
    tables["noise"] = predraw_noise(generators, noise, [True] * num_steps)
    scale = _init_scale(tables["sigma"][0], cfg.timestep_spacing == "leading")
    return Plan(ancestral_update, tables, scale, cfg.prediction_type)


def _plan_ddpm(config, num_steps, noise, generators) -> Plan:
    """diffusers DDPMScheduler (fixed_small variance): ancestral steps over integer timesteps.

    diffusers draws no noise for a step at t = 0 (its weight is 0 there anyway), nor do we.
    """
    cfg = SchedulerConfig.from_dict(config, "ddpm")
    tables = _euler_tables(cfg, num_steps, noise.device, integer=True)
    _, t_host = euler_schedule(cfg, num_steps, integer=True)
    tables["noise"] = predraw_noise(generators, noise, list(t_host != 0))
    clip = cfg.clip_sample_range if cfg.clip_sample else None
    return Plan(ancestral_update, tables, _init_scale(tables["sigma"][0], True),
                cfg.prediction_type, clip)  # fmt: skip


def _plan_ddim(config, num_steps, noise, generators) -> Plan:
    """diffusers DDIMScheduler with eta=0 (the unit noise is its initial latent as is)."""
    cfg = SchedulerConfig.from_dict(config, "ddim")
    sigmas, sigmas_next, timesteps = ddim_schedule(cfg, num_steps)
    tables = _tables(noise.device, sigma=sigmas, sigma_next=sigmas_next, t=timesteps)
    clip = cfg.clip_sample_range if cfg.clip_sample else None
    one = torch.ones((), device=noise.device)
    return Plan(partial(ddim_update, clip=clip), tables, one, cfg.prediction_type)


def _plan_dpmpp_2m(config, num_steps, noise, generators, *, karras: bool) -> Plan:
    """diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, use_karras_sigmas=karras)."""
    cfg = SchedulerConfig.from_dict(config, "dpmpp_2m")
    sigmas, timesteps = dpm_schedule(cfg, num_steps, karras=karras)
    sigma_prev = np.concatenate([sigmas[:1], sigmas[:-2]])  # row 0 has no history
    tables = _tables(noise.device, sigma=sigmas[:-1], sigma_next=sigmas[1:], t=timesteps,
                     sigma_prev=sigma_prev)  # fmt: skip
    steps = np.arange(num_steps)
    tables["second_order"] = torch.from_numpy((steps > 0) & (steps < num_steps - 1)).to(
        noise.device
    )
    scale = _init_scale(tables["sigma"][0], True)
    return Plan(dpmpp_2m_update, tables, scale, cfg.prediction_type)


SAMPLERS: dict[str, Callable[..., Plan]] = {
    "euler": partial(_plan_euler, karras=False),
    "euler_karras": partial(_plan_euler, karras=True),
    "euler_a": _plan_euler_a,
    "ddim": _plan_ddim,
    "ddpm": _plan_ddpm,
    "dpmpp_2m": partial(_plan_dpmpp_2m, karras=False),
    "dpmpp_2m_karras": partial(_plan_dpmpp_2m, karras=True),
}


def check_sampler(name: str) -> None:
    """Fail early, listing the valid names, for an unknown sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {sorted(SAMPLERS)}")


def plan(
    sampler: str,
    noise: Tensor,
    num_steps: int,
    scheduler_config: dict,
    generators: Sequence[torch.Generator] | None = None,
) -> Plan:
    """The run of `sampler` over `num_steps` for unit noise shaped like `noise` (B, C, H, W).

    Ancestral noise for image b is drawn here, once, from generators[b].
    """
    check_sampler(sampler)
    n_train = scheduler_config.get("num_train_timesteps", 1000)
    if not isinstance(num_steps, int) or not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be an integer in [1, {n_train}], got {num_steps!r}")
    if generators is not None and len(generators) != noise.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {noise.shape[0]}")
    return SAMPLERS[sampler](scheduler_config, num_steps, noise, generators)
