"""Training noise schedule and k-diffusion-style samplers that reproduce diffusers' schedulers.

Samplers are pure functions of a denoiser D(x, sigma, t) -> x0 on the variance-exploding scale
x = x0 + sigma * eps (Karras et al. 2022, arXiv:2206.00364); the eps/v-network is wrapped into
that denoiser once, by `denoiser`. Schedules are built once per call on the host (numpy, with
diffusers' own arithmetic so timesteps and sigmas match it exactly) and moved to the latent's
device as fp32 tensors, so the step loop never waits on the host. A sampler is a pure update
(D, x, previous x0, step row) -> (x, x0) plus the per-step tables it reads (`Plan`); `denoise_step`
applies one step in place over fixed buffers, which is what a CUDA graph replays. Nothing keeps
state between calls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

Model = Callable[[Tensor, Tensor], Tensor]  # (model input, timestep) -> raw eps or v prediction
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, sigma, timestep) -> x0
Tables = dict[str, Tensor]  # per-step schedule values, one row per step (or one step's row)
Update = Callable[[Denoiser, Tensor, Tensor, Tables], tuple[Tensor, Tensor]]  # -> (x, x0)

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


# --------------------------------------------------------------------------- training schedule


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


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (fp32, ascending)."""
    ac = alphas_cumprod_for(cfg)
    return (((1 - ac) / ac) ** 0.5).numpy()


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
        betas = betas_for(cfg)
        ac = torch.cumprod(1.0 - betas, dim=0)
        return cls(betas=betas, alphas_cumprod=ac, sigmas=((1 - ac) / ac) ** 0.5)

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


# --------------------------------------------------------------------------- sampling schedules


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


def _tables(device: torch.device, **arrays: np.ndarray) -> Tables:
    """fp32 device tensors from host schedule arrays (one copy per call, none in the loop)."""
    return {
        name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        for name, a in arrays.items()
    }


# --------------------------------------------------------------------------- denoiser + updates


def denoiser(model: Model, prediction_type: str) -> Denoiser:
    """Wrap an eps/v-network as D(x, sigma, t) -> x0 for x = x0 + sigma * eps (k-diffusion's external.py).

    The network sees x / sqrt(sigma^2 + 1), the variance-preserving input diffusers'
    scale_model_input gives it; its output is cast to fp32.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )

    def denoise(x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        out = model(x / (sigma**2 + 1) ** 0.5, t).float()
        if prediction_type == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)

    return denoise


def clipped(denoise: Denoiser, limit: float) -> Denoiser:
    """D with x0 clamped to [-limit, limit] (diffusers' clip_sample)."""
    return lambda x, sigma, t: denoise(x, sigma, t).clamp(-limit, limit)


# Each update is one sampler step as a pure function (D, x, previous x0, step row) -> (x, x0).
# The row holds this step's schedule values as 0-d device tensors (and its pre-drawn noise), so
# a step never reads the host: the loop can be compiled and captured as a CUDA graph.


def euler_update(denoise: Denoiser, x: Tensor, _prev: Tensor, s: Tables) -> tuple[Tensor, Tensor]:
    """Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma (arXiv:2206.00364 alg. 1)."""
    sigma = s["sigma"]
    x0 = denoise(x, sigma, s["t"])
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
    x0 = denoise(x, sigma, s["t"])
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
    x0 = denoise(x_ve, sigma, s["t"])
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
    x0 = denoise(x, sigma, s["t"])
    h = sigma.log() - sigma_next.log()  # +inf into sigma = 0, where the update gives x0
    r = (s["sigma_prev"].log() - sigma.log()) / h  # 0 on first-order rows: never selected
    second = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
    d = torch.where(s["second_order"], second, x0)
    return (sigma_next / sigma) * x - torch.expm1(-h) * d, x0


# --------------------------------------------------------------------------- plans + the step


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


@dataclass(frozen=True, eq=False)
class SamplerState:
    """The buffers a sampling run reads and overwrites in place, so a captured step replays on them."""

    denoise: Denoiser
    update: Update
    tables: Tables
    x: Tensor  # (B, C, H, W) fp32, the current latent
    x0: Tensor  # (B, C, H, W) fp32, the previous step's x0 (DPM-Solver++(2M)'s history)


def start(plan: Plan, model: Model, noise: Tensor) -> SamplerState:
    """The state before step 0: scaled unit noise (B, C, H, W) and an empty history."""
    x = noise.float() * plan.init_scale
    return SamplerState(plan.denoiser(model), plan.update, plan.tables, x, torch.zeros_like(x))


def denoise_step(state: SamplerState, i: Tensor) -> None:
    """Step i (a (1,) int64 tensor on the latent's device) in place: one denoiser call, one update.

    Rows are gathered with index_select, never with a Python number read from the device, so
    the step launches the same kernels whatever i is: one CUDA graph serves every step.
    """
    row = {k: v.index_select(0, i).squeeze(0) for k, v in state.tables.items()}
    x, x0 = state.update(state.denoise, state.x, state.x0, row)
    state.x.copy_(x)
    state.x0.copy_(x0)


def run_steps(state: SamplerState, num_steps: int, *, progress: bool = False) -> Tensor:
    """Run every step eagerly (or through a compiled denoiser) and return the final latent."""
    steps = torch.arange(num_steps, device=state.x.device)
    for k in step_range(num_steps, progress):
        denoise_step(state, steps[k : k + 1])
    return state.x


def step_range(n: int, progress: bool) -> Sequence[int]:
    """Step indices, with a tqdm bar only when asked."""
    return tqdm(range(n), desc="sampling", leave=False) if progress else range(n)


# --------------------------------------------------------------------------- planners + registry


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


def sample(
    sampler: str,
    model: Model,
    noise: Tensor,
    num_steps: int,
    scheduler_config: dict,
    generators: list[torch.Generator] | None = None,
    *,
    progress: bool = False,
) -> Tensor:
    """Denoise unit Gaussian `noise` (B, C, H, W) into the final latent as diffusers' `sampler` would.

    `model(x_in, t)` returns the network's raw eps or v prediction (per the config's
    prediction_type) for the scaled model input x_in and a 0-d fp32 timestep t. The initial
    noise is scaled here; ancestral noise for image b comes from generators[b]. Returns fp32.
    """
    p = plan(sampler, noise, num_steps, scheduler_config, generators)
    return run_steps(start(p, model, noise), p.num_steps, progress=progress)
