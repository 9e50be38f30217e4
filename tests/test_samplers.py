"""Samplers against diffusers' schedulers, step by step, on an analytic model (CPU)."""

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

from sdxl.models.configs import SCHEDULER
from sdxl.sampling.loop import progress_bar, sample
from sdxl.sampling.samplers import SAMPLERS, check_sampler

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
    return sample(name, analytic_model, noise, num_steps, config, generators=gens)


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
    for name in SAMPLERS:
        first = sample(name, analytic_model, noise, 10, SCHEDULER, generators())
        other = sample(name, analytic_model, noise, 4, SCHEDULER, generators())
        again = sample(name, analytic_model, noise, 10, SCHEDULER, generators())
        assert torch.equal(first, again), name
        assert not torch.equal(first, other), name


def test_ancestral_noise_is_per_image():
    """Image b depends only on its own generator: the same seed gives the same image in any batch."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    pair = sample("euler_a", analytic_model, noise, 8, SCHEDULER, generators())
    alone = sample(
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
    sample("euler_karras", spy, noise, 12, SCHEDULER, generators())
    ref = EulerDiscreteScheduler.from_config({**SCHEDULER, "use_karras_sigmas": True})
    ref.set_timesteps(12)
    assert all(t.ndim == 0 and t.dtype == torch.float32 for t in calls)
    torch.testing.assert_close(torch.stack(calls), ref.timesteps.float(), rtol=1e-6, atol=1e-4)


def test_callback_sees_every_step_and_changes_nothing():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    quiet = sample("dpmpp_2m", analytic_model, noise, 3, SCHEDULER)
    seen = []
    watched = sample("dpmpp_2m", analytic_model, noise, 3, SCHEDULER,
                     callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())))  # fmt: skip
    loud = sample("dpmpp_2m", analytic_model, noise, 3, SCHEDULER, callback=progress_bar(3))
    assert torch.equal(quiet, loud) and torch.equal(quiet, watched)
    assert [i for i, _, _ in seen] == [0, 1, 2] and torch.equal(seen[-1][1], quiet)
    assert all(x0.shape == SHAPE and torch.isfinite(x0).all() for _, _, x0 in seen)


def test_unknown_sampler_lists_valid_names():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*dpmpp_2m_karras"):
        sample("heun", analytic_model, noise, 4, SCHEDULER)
    with pytest.raises(ValueError, match="euler_a"):
        check_sampler("euler_ancestral")


def test_bad_arguments_are_rejected():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="num_steps"):
        sample("euler", analytic_model, noise, 0, SCHEDULER)
    with pytest.raises(ValueError, match="generators"):
        sample("euler_a", analytic_model, noise, 4, SCHEDULER, generators()[:1])
    with pytest.raises(ValueError, match="prediction_type"):
        sample("euler", analytic_model, noise, 4, {**SCHEDULER, "prediction_type": "sample"})


def test_unsupported_config_values_name_the_key():
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="solver_order"):
        sample("dpmpp_2m", analytic_model, noise, 4, {**SCHEDULER, "solver_order": 3})
    # A key only another scheduler class reads is ignored, as diffusers' from_config ignores it.
    out = sample("euler", analytic_model, noise, 2, {**SCHEDULER, "solver_order": 3})
    assert torch.isfinite(out).all()
