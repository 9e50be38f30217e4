"""Running a sampling plan: one step in place over fixed buffers, eagerly or as a CUDA graph.

`denoise_step` applies step i of a plan to the buffers of a `SamplerState`; the step index is a
device tensor and every schedule value is gathered on the device, so the step launches the same
kernels whatever i is: it compiles to one graph and one CUDA graph replays it for every step.
A callback (i, x, x0) after each step sees the run from the host, e.g. for a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdxl.progress import Progress
from sdxl.sampling.samplers import Denoiser, Model, Plan, Tables, Update, plan

Callback = Callable[[int, Tensor, Tensor], None]  # (step i, x after it, its x0); both buffers


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


def run_steps(state: SamplerState, num_steps: int, callback: Callback | None = None) -> Tensor:
    """Run every step eagerly (or through a compiled denoiser) and return the final latent."""
    steps = torch.arange(num_steps, device=state.x.device)
    for k in range(num_steps):
        denoise_step(state, steps[k : k + 1])
        if callback is not None:
            callback(k, state.x, state.x0)
    return state.x


def progress_bar(num_steps: int) -> Callback:
    """A callback that advances a progress bar over the run's steps and closes it after the last;
    a next run through the same callback (e.g. one per image) gets a bar of its own."""
    bar = None

    def advance(i: int, _x: Tensor, _x0: Tensor) -> None:
        nonlocal bar
        if bar is None or bar.closed:
            bar = Progress(num_steps, "sampling", "step", leave=False)
        bar.update(1)
        if i == num_steps - 1:
            bar.close()

    return advance


def sample(
    sampler: str,
    model: Model,
    noise: Tensor,
    num_steps: int,
    scheduler_config: dict,
    generators: Sequence[torch.Generator] | None = None,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Denoise unit Gaussian `noise` (B, C, H, W) into the final latent as diffusers' `sampler` would.

    `model(x_in, t)` returns the network's raw eps or v prediction (per the config's
    prediction_type) for the scaled model input x_in and a 0-d fp32 timestep t. The initial
    noise is scaled here; ancestral noise for image b comes from generators[b]. Returns fp32.
    """
    p = plan(sampler, noise, num_steps, scheduler_config, generators)
    return run_steps(start(p, model, noise), p.num_steps, callback)


class StaticLoop:
    """A sampling loop over fixed buffers: one run of a (sampler, steps, model, shape) key.

    Each run copies its model inputs (the UNet conditioning), schedule tables and noise into the
    buffers the step was recorded on, then replays the step once per index. With `capture`
    (CUDA) the step is one CUDA graph, so each step costs one launch; without it the same
    buffers run eagerly.
    """

    def __init__(self, plan: Plan, noise: Tensor, inputs: dict[str, Tensor],
                 make_model: Callable[[dict], Model], capture: bool) -> None:  # fmt: skip
        """`make_model(inputs)`: the model over (a static copy of) the run's `inputs`."""
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        tables = {k: v.clone() for k, v in plan.tables.items()}
        x = torch.empty_like(noise, dtype=torch.float32)
        denoise = plan.denoiser(make_model(self.inputs))
        self.state = SamplerState(denoise, plan.update, tables, x, torch.zeros_like(x))
        self.i = torch.zeros(1, dtype=torch.long, device=noise.device)
        self.graph = self._capture(plan, noise, inputs) if capture else None

    def load(self, plan: Plan, noise: Tensor, inputs: dict[str, Tensor]) -> None:
        """Copy one run's inputs into the static buffers (no reallocation, no host sync)."""
        for k, v in inputs.items():
            self.inputs[k].copy_(v)
        for k, v in plan.tables.items():
            self.state.tables[k].copy_(v)
        self.state.x.copy_(noise.float() * plan.init_scale)
        self.state.x0.zero_()

    def _step(self, k: int) -> None:
        self.i.fill_(k)
        if self.graph is None:
            denoise_step(self.state, self.i)
        else:
            self.graph.replay()

    def _capture(self, plan: Plan, noise: Tensor, inputs: dict[str, Tensor],
                 warmup: int = 2) -> torch.cuda.CUDAGraph:  # fmt: skip
        """Warm up on a side stream (compiles, cuDNN plans), then record one step."""
        self.load(plan, noise, inputs)
        side = torch.cuda.Stream(self.i.device)
        side.wait_stream(torch.cuda.current_stream(self.i.device))
        with torch.cuda.stream(side):
            for k in range(warmup):
                self.i.fill_(min(k, plan.num_steps - 1))
                denoise_step(self.state, self.i)
        torch.cuda.current_stream(self.i.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            denoise_step(self.state, self.i)
        return graph

    def run(self, plan: Plan, noise: Tensor, inputs: dict[str, Tensor],
            callback: Callback | None = None) -> Tensor:  # fmt: skip
        """The final latent of one run (a copy: the buffers belong to the next run)."""
        self.load(plan, noise, inputs)
        for k in range(plan.num_steps):
            self._step(k)
            if callback is not None:
                callback(k, self.state.x, self.state.x0)
        return self.state.x.clone()
