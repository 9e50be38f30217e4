"""The diffusion training objective on cached latents (Ho et al. 2020; min-SNR: Hang et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxl.noise_schedule import NoiseSchedule
from sdxl.train.config import TrainConfig


@dataclass
class StepNoise:
    """All randomness of one global batch, drawn on the generator's device (see data_order)."""

    latent: torch.Tensor  # (B, C, h, w) to sample mean + std * latent
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,) int64
    drop_caption: torch.Tensor  # (B,) bool
    flip: torch.Tensor  # (B,) bool

    def take(self, sl: slice) -> StepNoise:
        return StepNoise(*(getattr(self, k)[sl] for k in self.__dataclass_fields__))


def draw_step_noise(
    g: torch.Generator, batch: int, shape: tuple[int, int, int], cfg: TrainConfig,
    drop_rate: torch.Tensor | None = None,
) -> StepNoise:  # fmt: skip
    """Draw in a fixed order so the same generator always yields the same step.

    Everything is drawn on the generator's device, so a CUDA step needs no host-to-device copy
    of its noise and no host sync. `drop_rate` (batch,): each row's caption dropout rate when
    the data subsets' rates differ (default: cfg.caption_dropout for all).
    """
    dev = g.device
    latent = torch.randn((batch, *shape), generator=g, device=dev)
    noise = torch.randn((batch, *shape), generator=g, device=dev)
    offset = torch.randn((batch, shape[0], 1, 1), generator=g, device=dev)
    timesteps = torch.randint(cfg.timestep_min, cfg.timestep_max, (batch,), generator=g, device=dev)
    rate = cfg.caption_dropout if drop_rate is None else drop_rate
    drop = torch.rand(batch, generator=g, device=dev) < rate
    flip = torch.rand(batch, generator=g, device=dev) < 0.5
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * offset  # offset noise (Guttenberg 2023)
    return StepNoise(latent, noise, timesteps, drop, flip)


def per_sample_loss(
    unet: torch.nn.Module, batch: dict, rnd: StepNoise, schedule: NoiseSchedule,
    cfg: TrainConfig, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """MSE per sample (B,), fp32, with optional min-SNR-gamma weighting."""
    device = batch["mean"].device
    rnd = StepNoise(*(getattr(rnd, k).to(device) for k in rnd.__dataclass_fields__))
    x0 = batch["mean"] + batch["std"] * rnd.latent  # (B, 4, h, w) sample of q(z | image)
    t = rnd.timesteps
    noisy = schedule.add_noise(x0, rnd.noise, t)
    target = schedule.target(x0, rnd.noise, t, cfg.prediction_type)
    drop = rnd.drop_caption.view(-1, 1, 1)
    embeds = torch.where(drop, batch["empty_embeds"], batch["prompt_embeds"])
    pooled = torch.where(drop.view(-1, 1), batch["empty_pooled"], batch["pooled"])
    pred = unet(noisy.to(dtype), t, embeds.to(dtype), pooled.to(dtype), batch["time_ids"].to(dtype))
    loss = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if cfg.min_snr_gamma is not None:
        snr = schedule.snr(t)
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        if cfg.prediction_type == "v_prediction":
            weight = snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)
        loss = loss * weight
    return loss
