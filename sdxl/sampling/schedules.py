"""Sampling schedules: the noise levels and timesteps diffusers' schedulers step through.

Pure functions of the scheduler config and the step count, computed on the host in numpy with
diffusers' own arithmetic (timestep spacing per arXiv:2305.08891 Table 2, Karras sigmas per
arXiv:2206.00364 eq. 5), so timesteps and sigmas match it exactly. Sigmas are on the
variance-exploding scale x = x0 + sigma * eps.
"""

from __future__ import annotations

import numpy as np
import torch

from sdxl.noise_schedule import SchedulerConfig, train_sigmas


def spaced_timesteps(cfg: SchedulerConfig, num_steps: int, *, integer: bool) -> np.ndarray:
    """Model timesteps high to low per timestep_spacing (Table 2 of arXiv:2305.08891), as diffusers.

    Euler-type schedulers keep linspace timesteps fractional; the others round them.
    """
    n_train = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, n_train - 1, num_steps)[::-1]
        t = t.round() if integer else t.astype(np.float32)
    elif cfg.timestep_spacing == "leading":
        t = np.arange(num_steps)[::-1] * (n_train // num_steps) + cfg.steps_offset
    else:
        t = np.arange(n_train, 0, -n_train / num_steps).round() - 1
    return t.astype(np.float64)


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0
) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5 noise levels, high to low (rho=7 as diffusers)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by interpolating log sigma over the training table."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    n = log_train_sigmas.shape[0]
    low = np.clip(
        np.searchsorted(log_train_sigmas.astype(np.float64), log_s, side="right") - 1, 0, n - 2
    )
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_s) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def euler_schedule(
    cfg: SchedulerConfig, num_steps: int, *, karras: bool = False, integer: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmas (N+1, ending at 0) and timesteps (N) of diffusers' Euler / EulerAncestral schedulers.

    With integer timesteps this is also DDPM's schedule: sigma_t at t and 0 after the last step.
    """
    train = train_sigmas(cfg)
    timesteps = spaced_timesteps(cfg, num_steps, integer=integer)
    if cfg.interpolation_type == "linear":
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    else:  # log_linear: N+1 levels evenly spaced in log sigma, independent of the timesteps
        lo, hi = float(np.log(train[-1])), float(np.log(train[0]))
        sigmas = torch.linspace(lo, hi, num_steps + 1, dtype=torch.float32, device="cpu")
        sigmas = sigmas.exp().numpy()
    if karras:
        s_min = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        s_max = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(s_min, s_max, num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
    # log_linear without Karras keeps N+1 levels and so ends at sigma_0, not 0 (as diffusers).
    return np.concatenate([sigmas, [0.0]])[: num_steps + 1], timesteps


def dpm_schedule(
    cfg: SchedulerConfig, num_steps: int, *, karras: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmas (N+1, ending at 0) and integer timesteps (N) of diffusers' DPMSolverMultistep."""
    train = train_sigmas(cfg)
    if cfg.timestep_spacing == "trailing":
        timesteps = spaced_timesteps(cfg, num_steps, integer=True)
    else:  # the multistep solvers space N+1 points and drop the one nearest t=0
        timesteps = spaced_timesteps(cfg, num_steps + 1, integer=True)[:-1]
    if karras:
        sigmas = karras_sigmas(float(train[0]), float(train[-1]), num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train)).round()
    else:
        sigmas = train[timesteps.astype(np.int64)].astype(np.float64)
    return np.concatenate([sigmas, [0.0]]), timesteps


def ddim_schedule(
    cfg: SchedulerConfig, num_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start sigmas (N), target sigmas (N) and timesteps (N) of diffusers' DDIMScheduler.

    diffusers steps each t to t - T // N whatever the spacing, so with linspace spacing a
    step's target level is not the next step's start level; the final target is
    alpha_bar = 1 (sigma 0) with set_alpha_to_one, else alpha_bar_0.
    """
    train = train_sigmas(cfg).astype(np.float64)
    timesteps = spaced_timesteps(cfg, num_steps, integer=True)
    t_idx = timesteps.astype(np.int64)
    prev = t_idx - cfg.num_train_timesteps // num_steps
    final = 0.0 if cfg.set_alpha_to_one else train[0]
    sigmas_next = np.where(prev >= 0, train[np.maximum(prev, 0)], final)
    return train[t_idx], sigmas_next, timesteps
