"""The fast path of generation: one denoise step over static buffers, compiled and replayable.

On CPU: the step and the guided UNet compile as one graph per shape (fullgraph=True, no graph
breaks, no recompiles for new steps, batches or seeds), give exactly the eager results in fp32,
and the static-buffer loop a CUDA graph replays equals the plain loop across runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from sdxl import load_pipeline
from sdxl.models.configs import SCHEDULER
from sdxl.noise_schedule import SchedulerConfig
from sdxl.pipeline import FastPath, SampleSettings
from sdxl.sampling import loop, samplers
from sdxl.sampling.samplers import NoiseLevel
from sdxl.sampling.schedules import euler_schedule

KW = dict(num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture
def pipe(tiny_dir):
    """A pipeline of its own: the tests switch its fast path."""
    return load_pipeline(tiny_dir)


@pytest.fixture
def dynamo():
    """A clean dynamo cache and counters, so frame counts belong to this test alone."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap nonlinear stand-in for the guided UNet."""
    return torch.tanh(x_in) * torch.cos(0.01 * t) + 0.1 * x_in


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_denoise_step_compiles_once_for_every_step(sampler, dynamo):
    """fullgraph: any .item(), Python branch on a tensor or graph break would raise here; one
    frame for all steps: the step index is a tensor, not a constant baked into the graph."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    plan = samplers.plan(sampler, noise, 6, SCHEDULER, gens())
    eager = loop.run_steps(loop.start(plan, _model, noise), plan.num_steps)
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(loop.denoise_step, fullgraph=True, dynamic=False, backend=counter)
    state = loop.start(samplers.plan(sampler, noise, 6, SCHEDULER, gens()), _model, noise)
    for k in range(plan.num_steps):
        step(state, torch.tensor([k]))
    assert counter.frame_count == 1 and not counters["graph_break"]
    assert torch.equal(state.x, eager)


def test_predrawn_ancestral_noise_equals_drawing_at_each_step():
    """euler_a draws all its noise before step 0; the draws are those of the old per-step loop."""
    cfg = SchedulerConfig.from_dict(SCHEDULER, "euler_a")
    seeds, shape = (3, 4), (1, 4, 8, 8)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
    got = loop.sample("euler_a", _model, noise, 5, SCHEDULER, generators=gens)

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
    sigmas_np, t_np = euler_schedule(cfg, 5)
    sigmas, ts = (torch.tensor(a, dtype=torch.float32) for a in (sigmas_np, t_np))
    denoise, x = (
        samplers.denoiser(_model, cfg.prediction_type),
        noise * (sigmas[0] ** 2 + 1) ** 0.5,
    )
    for i in range(5):  # the loop before pre-drawing: noise drawn after each step's update
        sigma, nxt = sigmas[i], sigmas[i + 1]
        up = (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5
        down = (nxt**2 - up**2).clamp(min=0) ** 0.5
        x = x + (x - denoise(x, NoiseLevel(sigma, ts[i]))) / sigma * (down - sigma)
        x = x + torch.cat([torch.randn(shape, generator=g) for g in gens]) * up
    assert torch.equal(got, x)


def test_compiled_pipeline_equals_eager_with_no_recompiles(pipe, dynamo):
    """Guided UNet + VAE decode compiled (aot_eager): images equal eager exactly in fp32; one
    frame per (function, shape): a second shape compiles once, a new batch/seed never."""
    runs = [(["a red circle"], SampleSettings(seed=1, width=64, height=64, **KW)),
            (["a blue square"], SampleSettings(seed=2, width=96, height=64, **KW)),
            (["a green star"], SampleSettings(seed=7, width=64, height=64, **KW))]  # fmt: skip
    want = [pipe.generate(p, settings) for p, settings in runs]
    counter = CompileCounterWithBackend("aot_eager")
    pipe.use_fast_path(FastPath(compile=True, backend=counter))
    got = [pipe.generate(p, settings) for p, settings in runs]
    assert counter.frame_count == 4  # guided UNet and decode, at 64x64 and 96x64
    assert not counters["graph_break"]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(g[0]), np.asarray(w[0]))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_static_loop_equals_the_plain_loop_across_runs(pipe, sampler):
    """The buffers a CUDA graph replays on (here run eagerly, on CPU) are refilled each run:
    a second batch with other prompts and seeds gets its own images, not the first one's."""
    prompts = [["a red circle", "a blue square"], ["a green star", "a pink ring"]]
    settings = [SampleSettings(width=64, height=64, sampler=sampler, seed=s, **KW) for s in (1, 9)]
    want = [pipe.generate_latents(p, ss) for p, ss in zip(prompts, settings, strict=True)]
    pipe.fast = FastPath(cuda_graphs=True)  # what use_fast_path refuses on CPU: no capture here
    got = [pipe.generate_latents(p, ss) for p, ss in zip(prompts, settings, strict=True)]
    assert len(pipe._loops) == 1
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_cuda_graphs_need_a_cuda_device(pipe):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        pipe.use_fast_path(FastPath(compile=True, cuda_graphs=True))


def test_default_fast_path_is_on_for_cuda_only():
    assert FastPath.default("cuda:0") == FastPath(compile=True, cuda_graphs=True)
    assert FastPath.default("cpu") == FastPath()
    assert FastPath.default("cpu", compile=True) == FastPath(compile=True)
    assert FastPath.default("cuda", compile=False) == FastPath()
