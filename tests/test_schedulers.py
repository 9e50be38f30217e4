"""Training schedule and samplers against diffusers' schedulers, on an analytic model (CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from sdxl import schedulers
from sdxl.models.configs import SCHEDULER

SHAPE = (2, 4, 8, 8)
SEEDS = [1000, 1001]
# Our sampler name -> (diffusers class, config overrides that select the same algorithm).
REFERENCE = {
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
MIX = torch.tensor(
    [
        [0.8, -0.3, 0.2, 0.1],
        [0.25, 0.7, -0.2, 0.15],
        [-0.1, 0.3, 0.9, -0.25],
        [0.2, -0.15, 0.1, 0.6],
    ]
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: one intra-op thread avoids thread wake-up costs on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analytic_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth deterministic stand-in for the UNet: per-channel mixing, nonlinear in x and t."""
    t = t.to(torch.float32).reshape(-1, 1, 1, 1)
    mixed = (MIX[None, :, :, None, None] * x_in.float()[:, None]).sum(2)  # (B, 4, H, W)
    # cos(0.05 t) makes the output sensitive to fractional timesteps (a wrong rounding shows).
    return torch.tanh(mixed) * (0.6 + 0.3 * torch.cos(0.05 * t)) + 0.2 * torch.sin(
        2.0 * x_in + t / 1000
    )


def generators() -> list[torch.Generator]:
    """Per-image CPU generators, seeded as the pipeline seeds them (seed + index)."""
    return [torch.Generator("cpu").manual_seed(s) for s in SEEDS]


def run_diffusers(name: str, config: dict, num_steps: int, gens=None) -> torch.Tensor:
    """The diffusers pipeline loop, generators used first for the initial noise as the pipeline does."""
    cls, overrides = REFERENCE[name]
    sched = cls.from_config({**config, **overrides})
    gens = generators() if gens is None else gens
    noise = randn_tensor(SHAPE, generator=gens, dtype=torch.float32)
    sched.set_timesteps(num_steps)
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t)
        out = analytic_model(x_in, t)
        latents = sched.step(out, t, latents, generator=gens).prev_sample
    return latents


def run_ours(name: str, config: dict, num_steps: int, gens=None) -> torch.Tensor:
    """Our entry point with the same seeds and the same initial noise draw."""
    gens = generators() if gens is None else gens
    noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    return schedulers.sample(name, analytic_model, noise, num_steps, config, generators=gens)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 parity: max error below 1e-4 of the reference's scale, or below 1e-5 absolute."""
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 1e-5 or err < 1e-4 * scale, f"max abs err {err:.3g} (ref scale {scale:.3g})"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_sampler_matches_diffusers(name, prediction_type, spacing):
    config = {**SCHEDULER, "prediction_type": prediction_type, "timestep_spacing": spacing}
    for num_steps in (1, 4, 10, 25):
        ours, ref = run_ours(name, config, num_steps), run_diffusers(name, config, num_steps)
        assert_close(ours, ref)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("euler", {"interpolation_type": "log_linear"}),
        ("euler_karras", {"interpolation_type": "log_linear"}),
        ("euler_karras", {"sigma_min": 0.1, "sigma_max": 10.0}),
        ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("dpmpp_2m_karras", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("ddim", {"set_alpha_to_one": True}),
        ("ddim", {"clip_sample": True, "clip_sample_range": 0.5}),
        ("ddpm", {"clip_sample": True, "clip_sample_range": 0.5}),
        ("ddim", {"steps_offset": 0}),
        ("dpmpp_2m", {"steps_offset": 0, "timestep_spacing": "leading"}),
    ],
)
def test_sampler_config_variants_match_diffusers(name, overrides):
    config = {**SCHEDULER, **overrides}
    for num_steps in (1, 7, 20):
        assert_close(run_ours(name, config, num_steps), run_diffusers(name, config, num_steps))


def test_class_defaults_apply_to_missing_keys():
    """A config without spacing/clip keys gets each diffusers class's own defaults."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    config = {k: SCHEDULER[k] for k in keys}
    for name in ("euler", "ddim", "ddpm", "dpmpp_2m"):
        assert_close(run_ours(name, config, 6), run_diffusers(name, config, 6))


def test_many_steps_match_diffusers():
    """A long Karras DPM++ schedule, where rounded timesteps near t=0 repeat."""
    assert_close(
        run_ours("dpmpp_2m_karras", SCHEDULER, 50), run_diffusers("dpmpp_2m_karras", SCHEDULER, 50)
    )


@pytest.mark.parametrize(
    "name, spacing", [("euler_a", "leading"), ("ddpm", "leading"), ("ddpm", "linspace")]
)
def test_generators_advance_as_in_diffusers(name, spacing):
    """Each generator makes exactly diffusers' draws, so its next number is the same afterwards."""
    config = {**SCHEDULER, "timestep_spacing": spacing}
    ours, ref = generators(), generators()
    run_ours(name, config, 5, ours)
    run_diffusers(name, config, 5, ref)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))


def test_sampler_is_stateless():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for name in schedulers.SAMPLERS:
        first = schedulers.sample(name, analytic_model, noise, 10, SCHEDULER, generators())
        other = schedulers.sample(name, analytic_model, noise, 4, SCHEDULER, generators())
        again = schedulers.sample(name, analytic_model, noise, 10, SCHEDULER, generators())
        assert torch.equal(first, again), name
        assert not torch.equal(first, other), name


def test_ancestral_noise_is_per_image():
    """Image b depends only on its own generator: the same seed gives the same image in any batch."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    pair = schedulers.sample("euler_a", analytic_model, noise, 8, SCHEDULER, generators())
    alone = schedulers.sample(
        "euler_a",
        analytic_model,
        noise[1:],
        8,
        SCHEDULER,
        [torch.Generator().manual_seed(SEEDS[1])],
    )
    assert torch.equal(pair[1:], alone)


def test_model_sees_diffusers_timesteps_and_inputs():
    """The model is called once per step with diffusers' timesteps and scaled inputs."""
    calls = []

    def spy(x_in, t):
        calls.append(t.clone())
        return analytic_model(x_in, t)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    schedulers.sample("euler_karras", spy, noise, 12, SCHEDULER, generators())
    ref = EulerDiscreteScheduler.from_config({**SCHEDULER, "use_karras_sigmas": True})
    ref.set_timesteps(12)
    assert all(t.ndim == 0 and t.dtype == torch.float32 for t in calls)
    torch.testing.assert_close(torch.stack(calls), ref.timesteps.float(), rtol=1e-6, atol=1e-4)


def test_progress_flag_runs():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    quiet = schedulers.sample("dpmpp_2m", analytic_model, noise, 3, SCHEDULER)
    loud = schedulers.sample("dpmpp_2m", analytic_model, noise, 3, SCHEDULER, progress=True)
    assert torch.equal(quiet, loud)


def test_unknown_sampler_lists_valid_names():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*dpmpp_2m_karras"):
        schedulers.sample("heun", analytic_model, noise, 4, SCHEDULER)
    with pytest.raises(ValueError, match="euler_a"):
        schedulers.check_sampler("euler_ancestral")


def test_bad_arguments_are_rejected():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="num_steps"):
        schedulers.sample("euler", analytic_model, noise, 0, SCHEDULER)
    with pytest.raises(ValueError, match="generators"):
        schedulers.sample("euler_a", analytic_model, noise, 4, SCHEDULER, generators()[:1])
    with pytest.raises(ValueError, match="prediction_type"):
        schedulers.sample(
            "euler", analytic_model, noise, 4, {**SCHEDULER, "prediction_type": "sample"}
        )


def test_unsupported_config_values_name_the_key():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="solver_order"):
        schedulers.sample("dpmpp_2m", analytic_model, noise, 4, {**SCHEDULER, "solver_order": 3})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        schedulers.NoiseSchedule.from_config({**SCHEDULER, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        schedulers.NoiseSchedule.from_config({**SCHEDULER, "beta_schedule": "squaredcos_cap_v2"})
    # A key only another scheduler class reads is ignored, as diffusers' from_config ignores it.
    out = schedulers.sample("euler", analytic_model, noise, 2, {**SCHEDULER, "solver_order": 3})
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_noise_schedule_matches_ddpm_scheduler(beta_schedule):
    config = {**SCHEDULER, "beta_schedule": beta_schedule}
    if beta_schedule == "linear":
        config.update(beta_start=0.0001, beta_end=0.02)
    ours, ref = schedulers.NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
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
    ours = schedulers.NoiseSchedule.from_config(SCHEDULER).to("cpu")
    x0, noise = torch.ones(SHAPE), torch.zeros(SHAPE)
    t = torch.tensor(500)
    expected = ours.alphas_cumprod[500] ** 0.5
    torch.testing.assert_close(ours.add_noise(x0, noise, t), expected.expand(SHAPE))
    assert ours.snr(torch.tensor([0, 999])).shape == (2,)
    meta = ours.to("meta")
    assert meta.add_noise(
        x0.to("meta"), noise.to("meta"), torch.tensor([1, 2], device="meta")
    ).is_meta
