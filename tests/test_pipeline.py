"""End to end: our text-to-image equals diffusers' StableDiffusionXLPipeline on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl import load_pipeline
from sdxl.pipeline import SampleSettings

DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
}


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def _reference_images(pipe, sampler, prompts, negative, seed, **kw):
    import diffusers

    name, overrides = DIFFUSERS_SCHEDULERS[sampler]
    # from the original config: a scheduler built from another's config inherits its options
    pipe.scheduler = getattr(diffusers, name).from_config(
        pipe.original_scheduler_config, **overrides
    )
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompts,
        negative_prompt=[negative] * len(prompts) if negative else None,
        generator=generators,
        **kw,
    ).images


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize("negative", ["", "blurry, dark"])
def test_images_match_diffusers(ours, reference, sampler, negative):
    prompts = ["a red circle on a white background", "a photo of south beach, san francisco"]
    kw = dict(width=96, height=64, num_inference_steps=5, guidance_scale=6.0)
    got = ours.generate(
        prompts, SampleSettings(negative_prompt=negative, sampler=sampler, seed=7, **kw)
    )
    want = _reference_images(reference, sampler, prompts, negative, 7, **kw)
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, dtype=np.int16), np.asarray(w, dtype=np.int16)
        assert g.shape == w.shape == (64, 96, 3)
        assert w.std() > 5, "reference image is flat: the comparison would prove nothing"
        assert np.abs(g - w).max() <= 2


def test_image_depends_only_on_seed_and_index(ours):
    prompts = ["a blue square", "a green star", "a yellow heart"]
    settings = SampleSettings(width=64, height=64, num_inference_steps=3, guidance_scale=5.0,
                              seed=11)  # fmt: skip
    batch = ours.generate(prompts, settings)
    last = ours.generate(prompts[2:], settings, indices=[2])
    assert np.array_equal(np.asarray(batch[2]), np.asarray(last[0]))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_guidance_off_and_rescale_run(ours):
    kw = dict(width=64, height=64, num_inference_steps=2)
    plain = ours.generate("a red circle", SampleSettings(guidance_scale=1.0, **kw))
    rescaled = ours.generate("a red circle",
                             SampleSettings(guidance_scale=7.0, guidance_rescale=0.7, **kw))  # fmt: skip
    assert plain[0].size == rescaled[0].size == (64, 64)
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(rescaled[0]))


def test_guidance_rescale_matches_diffusers(ours, reference):
    kw = dict(width=64, height=64, num_inference_steps=3, guidance_scale=7.0,
              guidance_rescale=0.7)  # fmt: skip
    got = ours.generate(["a red circle"], SampleSettings(sampler="euler", seed=3, **kw))
    want = _reference_images(reference, "euler", ["a red circle"], "", 3, **kw)
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(want[0], np.int16)).max() <= 2


@pytest.mark.parametrize("size", [(100, 64), (64, 30), (8192, 64)])
def test_bad_size_is_a_clear_error(ours, size):
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.generate("x", SampleSettings(width=size[0], height=size[1], num_inference_steps=1))


def test_unknown_sampler_is_a_clear_error(ours):
    with pytest.raises(ValueError, match="euler"):
        ours.generate("x", SampleSettings(width=64, height=64, num_inference_steps=1,
                                          sampler="heun_plus"))  # fmt: skip


def test_builtin_tiny_and_default_size(tiny_dir):
    pipe = load_pipeline("builtin:tiny")
    assert pipe.default_size == 128
    image = pipe.generate("a red circle", SampleSettings(num_inference_steps=1))[0]
    assert image.size == (128, 128)


def test_truncation_warning_names_the_image_index(ours, caplog):
    long = "a red circle on a white background " * 20
    settings = SampleSettings(width=64, height=64, num_inference_steps=1, guidance_scale=1.0)
    ours.generate(["a blue square", long], settings, indices=[7, 1234])
    assert "image 1234:" in caplog.text and "prompt 1" not in caplog.text


def test_failed_fp32_vae_retry_restores_the_vae_dtype():
    from types import SimpleNamespace

    from sdxl.pipeline import decode_latents

    class OverflowingVAE(torch.nn.Module):
        """NaN in bf16; the fp32 retry runs out of memory."""

        config = SimpleNamespace(scaling_factor=1.0)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

        def decode(self, z):
            if z.dtype == torch.float32:
                raise RuntimeError("out of memory")
            return torch.full_like(z, float("nan"))

    vae = OverflowingVAE()
    with pytest.raises(RuntimeError, match="out of memory"):
        decode_latents(vae, torch.zeros(1, 4, 2, 2))
    assert vae.weight.dtype == torch.bfloat16
