"""The training noise schedule: the model's scheduler_config.json, its betas, q(x_t | x_0).

Training (the noise added, the loss target, min-SNR weights) and every sampler read the betas
and alpha_bar computed here, with diffusers' own arithmetic, so the two cannot drift apart.
`SchedulerConfig.from_dict` reads the config as a given diffusers scheduler class would.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdxl.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
FAMILIES = ("euler", "euler_a", "ddim", "ddpm", "dpmpp_2m")  # one per diffusers scheduler class

# Defaults that differ between the diffusers scheduler classes (for keys a config leaves out).
_FAMILY_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace"},
    "euler_a": {"timestep_spacing": "linspace"},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
    "ddim": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "ddpm": {"timestep_spacing": "leading", "clip_sample": True},
}
# Fields only some classes read; every other class keeps the neutral dataclass default.
_READ_ONLY_BY = {
    "interpolation_type": {"euler"},
    "sigma_min": {"euler"},
    "sigma_max": {"euler"},
    "set_alpha_to_one": {"ddim"},
    "clip_sample": {"ddim", "ddpm"},
    "clip_sample_range": {"ddim", "ddpm"},
}
_ALL = set(FAMILIES)
# Keys whose other values change the maths in ways we do not implement:
# key -> (supported values, the classes that read the key).
_FIXED = {
    "rescale_betas_zero_snr": ((False,), _ALL),
    "thresholding": ((False,), {"ddim", "ddpm", "dpmpp_2m"}),
    "timestep_type": (("discrete",), {"euler"}),
    "use_exponential_sigmas": ((False,), {"euler", "dpmpp_2m"}),
    "use_beta_sigmas": ((False,), {"euler", "dpmpp_2m"}),
    "final_sigmas_type": (("zero",), {"euler", "dpmpp_2m"}),
    "use_lu_lambdas": ((False,), {"dpmpp_2m"}),
    "use_flow_sigmas": ((False,), {"dpmpp_2m"}),
    "use_dynamic_shifting": ((False,), {"dpmpp_2m"}),
    "algorithm_type": (("dpmsolver++",), {"dpmpp_2m"}),
    "solver_order": ((2,), {"dpmpp_2m"}),
    "solver_type": (("midpoint",), {"dpmpp_2m"}),
    "lambda_min_clipped": ((-math.inf,), {"dpmpp_2m"}),
    "variance_type": ((None, "fixed_small"), {"ddpm", "dpmpp_2m"}),
}


def read_scheduler_config(model_dir: Path) -> tuple[dict, Path]:
    """The model's scheduler_config.json (and its path, for messages)."""
    path = model_dir / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({err}); download the model again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; download the model again")
    return config, path


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler_config.json keys our schedules read (diffusers' defaults where absent)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        """Reject values no sampler here implements, naming the key."""
        allowed = {
            "beta_schedule": ("linear", "scaled_linear"),
            "prediction_type": PREDICTION_TYPES,
            "timestep_spacing": SPACINGS,
            "interpolation_type": ("linear", "log_linear"),
        }
        if self.trained_betas is not None:  # explicit betas replace the named schedule
            del allowed["beta_schedule"]
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(
                    f"scheduler config: {key}={getattr(self, key)!r} is not supported; use one of {values}"
                )
        if self.num_train_timesteps < 2:
            raise ValueError("scheduler config: num_train_timesteps must be at least 2")

    @classmethod
    def from_dict(cls, config: dict, family: str | None = None) -> SchedulerConfig:
        """Parse a diffusers scheduler_config.json dict as the scheduler class of `family` would.

        One config file is shared by every diffusers scheduler class and each reads only its own
        keys, so keys we do not know are ignored; keys the class reads with a value we do not
        implement raise ValueError.
        """
        for key, (supported, read_by) in _FIXED.items():
            reads = family in read_by if family else read_by == _ALL
            if reads and key in config and config[key] not in supported:
                who = f"the {family!r} sampler" if family else "the noise schedule"
                raise ValueError(
                    f"scheduler config: {key}={config[key]!r} is not supported by {who}; "
                    f"supported: {supported}"
                )
        values = dict(_FAMILY_DEFAULTS.get(family, {}))
        for field in dataclasses.fields(cls):
            name = field.name
            if name in config and (name not in _READ_ONLY_BY or family in _READ_ONLY_BY[name]):
                values[name] = config[name]
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return cls(**values)


def betas_for(cfg: SchedulerConfig) -> Tensor:
    """Per-step betas (T,) in fp32, computed exactly as diffusers does."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return torch.tensor(cfg.trained_betas, dtype=torch.float32, device="cpu")
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32, device="cpu")
    start, end = cfg.beta_start**0.5, cfg.beta_end**0.5
    return torch.linspace(start, end, n, dtype=torch.float32, device="cpu") ** 2


def alphas_cumprod_for(cfg: SchedulerConfig) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) fp32: training and sampling share this."""
    return torch.cumprod(1.0 - betas_for(cfg), dim=0)


def sigmas_for(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """The sigmas of t = 0..T-1 (fp32, ascending), for the sampling schedules."""
    return sigmas_for(alphas_cumprod_for(cfg)).numpy()


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """DDPM forward process q(x_t | x_0) (Ho et al. 2020, arXiv:2006.11239), fp32 tables over t."""

    betas: Tensor  # (T,)
    alphas_cumprod: Tensor  # (T,)
    sigmas: Tensor  # (T,) sqrt((1 - alpha_bar) / alpha_bar), ascending in t

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """Build the tables from a diffusers scheduler_config.json dict."""
        cfg = SchedulerConfig.from_dict(config)
        ac = alphas_cumprod_for(cfg)
        return cls(betas=betas_for(cfg), alphas_cumprod=ac, sigmas=sigmas_for(ac))

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same tables on `device`, so per-step lookups need no copy."""
        return NoiseSchedule(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def _at(self, table: Tensor, t: Tensor, ndim: int) -> Tensor:
        """table[t] on t's device, shaped (B, 1, ..., 1) to broadcast over an ndim-d batch."""
        return table.to(t.device)[t.long()].reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        a = self._at(self.alphas_cumprod, t, x0.ndim)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho, arXiv:2202.00512)."""
        a = self._at(self.alphas_cumprod, t, x0.ndim)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What the network learns to predict at t: the noise or the velocity."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), shaped like t (for min-SNR weights)."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return a / (1 - a)
