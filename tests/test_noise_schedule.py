"""The training noise schedule against diffusers' DDPMScheduler (CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdxl.models.configs import SCHEDULER
from sdxl.noise_schedule import NoiseSchedule

SHAPE = (2, 4, 8, 8)


def test_unsupported_config_values_name_the_key():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        NoiseSchedule.from_config({**SCHEDULER, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({**SCHEDULER, "beta_schedule": "squaredcos_cap_v2"})


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_noise_schedule_matches_ddpm_scheduler(beta_schedule):
    config = {**SCHEDULER, "beta_schedule": beta_schedule}
    if beta_schedule == "linear":
        config.update(beta_start=0.0001, beta_end=0.02)
    ours, ref = NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([3, 917])
    torch.testing.assert_close(
        ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=0
    )
    torch.testing.assert_close(
        ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=0
    )
    assert torch.equal(ours.target(x0, noise, t, "epsilon"), noise)
    assert torch.equal(ours.target(x0, noise, t, "v_prediction"), ours.velocity(x0, noise, t))
    a = ref.alphas_cumprod
    torch.testing.assert_close(ours.snr(t), a[t] / (1 - a[t]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.sigmas, ((1 - a) / a) ** 0.5, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        ours.target(x0, noise, t, "sample")


def test_noise_schedule_scalar_t_and_device_move():
    ours = NoiseSchedule.from_config(SCHEDULER).to("cpu")
    x0, noise = torch.ones(SHAPE), torch.zeros(SHAPE)
    t = torch.tensor(500)
    expected = ours.alphas_cumprod[500] ** 0.5
    torch.testing.assert_close(ours.add_noise(x0, noise, t), expected.expand(SHAPE))
    assert ours.snr(torch.tensor([0, 999])).shape == (2,)
    meta = ours.to("meta")
    assert meta.add_noise(
        x0.to("meta"), noise.to("meta"), torch.tensor([1, 2], device="meta")
    ).is_meta
