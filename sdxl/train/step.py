"""One LoRA training step, the same function for the trainer and benchmarks/bench_train.py.

`train_step(step, micro)` is one optimizer update over the staged micro-batches of an
accumulation group: forward + backward of each into preallocated gradients, then one
all-reduce, unscale (fp16), clip, an on-device finiteness flag and the optimizer step, which
the flag skips on the device (GradScaler's `found_inf` semantics). Nothing inside reads a
value back to the host; the results are device tensors that the trainer reads at log time.

Every step of a bucket has the same shapes and, staged into that bucket's buffers, the same
input addresses, which is what the two fast paths need:
- compile: `torch.compile(fullgraph=True, dynamic=False)` of the loss (UNet forward and
  objective; AOTAutograd compiles its backward), one graph per bucket; compile_mode
  "regional" compiles each transformer block and resnet instead (shorter compile).
- cuda_graphs: the whole update (zero grads, forward, backward, all-reduce, clip, flag, fused
  AdamW, EMA) captured by hand as one `torch.cuda.CUDAGraph` per bucket after two eager warm-up
  steps of that bucket, then replayed. By hand, because `mode="reduce-overhead"` graphs the
  compiled forward and backward but leaves the optimizer step and all-reduce outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from sdxl.errors import UserError
from sdxl.noise_schedule import NoiseSchedule
from sdxl.train import distributed
from sdxl.train.config import TrainConfig
from sdxl.train.data_order import rank_rows
from sdxl.train.ema import LoRAEMA
from sdxl.train.loss import StepNoise
from sdxl.train.optim import skips_on_device
from sdxl.utils import to_dtype

if TYPE_CHECKING:
    from sdxl.train.text_encoding import StepText

GRAPH_WARMUP = 2  # eager steps of a bucket before its capture (lazy state, cuDNN autotuning)
RECOMPILE_LIMIT = 64  # dynamo entries per function: one per bucket, far more than any run uses


@dataclass
class StepResult:
    """What one update leaves on the device for logging (read back only at log time)."""

    losses: torch.Tensor  # (micro, G) per-sample loss of every global row, padding rows 0
    grad_norm: torch.Tensor  # 0-d, before clipping
    skipped: torch.Tensor  # 0-d, 1.0 = non-finite gradients, update skipped


class TrainStep:
    """The preallocated state one update works on: flat gradients, loss rows, flags, buffers.

    `loss_fn(model, batch, rnd, schedule, cfg, dtype) -> (B,)` is the per-sample objective
    (`sdxl.train.loss.per_sample_loss`); `empty` the empty caption's (embeds, pooled).
    """

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, schedule: NoiseSchedule, cfg: TrainConfig,
                 dist: distributed.DistInfo, loss_fn: Callable, empty: tuple[torch.Tensor, ...],
                 *, scaler: torch.amp.GradScaler | None = None, ema: LoRAEMA | None = None,
                 backend: str = "inductor", text: StepText | None = None):  # fmt: skip
        self.model, self.params, self.optimizer, self.ema = model, params, optimizer, ema
        self.text = text  # captions encoded in the step (sdxl/train/text_encoding.py), or None
        self.schedule, self.cfg, self.loss_fn, self.device = schedule, cfg, loss_fn, dist.device
        self.dtype = to_dtype(cfg.precision)
        self.empty = empty
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None  # bypassed
        self.rows = rank_rows(dist.rank, cfg.batch_size)
        self.max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        self._preallocate(cfg.gradient_accumulation_steps, cfg.batch_size * dist.world)
        self._tensor_lr()
        self.loss_of = self._compiled(backend) if _auto(cfg.compile, self.device) else self._loss
        self.use_graphs = self._graphs_wanted()
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.warm: dict[tuple, int] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _preallocate(self, micro: int, global_batch: int) -> None:
        """One flat buffer: the gradients (as the params' .grad views), then the loss rows.

        Autograd accumulates into an existing .grad in place, so the views stay; zeroing and
        the all-reduce are then one kernel and one collective on the whole buffer.
        """
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + micro * global_batch, device=self.device)
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.losses = self.flat[n:].view(micro, global_batch)
        self.grad_norm = torch.zeros((), device=self.device)
        self.found_inf = torch.zeros((), device=self.device)
        if skips_on_device(self.optimizer):
            self.optimizer.found_inf = self.found_inf  # read by the fused kernel at each step

    def _tensor_lr(self) -> None:
        """A fused optimizer's learning rate as a device tensor, filled in place by `set_group_lrs`.

        (Also after a resume: a loaded state dict brings its own, host-side, value.)
        """
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)

    def _compiled(self, backend: str) -> Callable:
        """The loss compiled whole (one graph per bucket), or the model's blocks compiled."""
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
        )
        if self.cfg.compile_mode == "full":
            return torch.compile(self._loss, fullgraph=True, dynamic=False, backend=backend)
        from sdxl.models.unet import BasicTransformerBlock, ResnetBlock2D

        for module in self.model.modules():
            if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
                module.compile(fullgraph=True, dynamic=False, backend=backend)
        return self._loss

    def _graphs_wanted(self) -> bool:
        """cuda_graphs as asked, or on CUDA when the step can be captured (None = auto)."""
        asked = self.cfg.cuda_graphs
        blocker = self._graph_blocker()
        if asked and blocker:
            raise UserError(f"--cuda_graphs: {blocker}; drop --cuda_graphs")
        return bool(_auto(asked, self.device) and not blocker)

    def _graph_blocker(self) -> str | None:
        if self.device.type != "cuda":
            return "CUDA graphs need a CUDA GPU"
        if self.cfg.gradient_accumulation_steps > 1:
            return "one graph holds one micro-batch; gradient_accumulation_steps must be 1"
        if self.scaler is not None:
            return "fp16 loss scaling is not captured; use bf16"
        if not skips_on_device(self.optimizer):
            return f"--optimizer {self.cfg.optimizer} cannot skip a step on the device (only adamw)"
        return None

    # ------------------------------------------------------------------ staging

    def stage(self, host: dict[str, torch.Tensor], rnd: StepNoise, slot: int = 0) -> dict:
        """Copy a micro-batch (host rows + this rank's draws) into its static device buffers.

        Buffers are per (slot in the group, bucket shape): the same addresses every time, as
        a CUDA graph needs; host rows are pinned on CUDA, so the copies do not block.
        """
        mine = rnd.take(self.rows)
        fresh = {**host, **{f.name: getattr(mine, f.name) for f in fields(mine)}}
        key = (slot, *host["mean"].shape)
        if key not in self.buffers:
            self.buffers[key] = {
                k: torch.empty_like(v, device=self.device) for k, v in fresh.items()
            }
        buf = self.buffers[key]
        for k, v in fresh.items():
            buf[k].copy_(v, non_blocking=True)
        return buf

    # ------------------------------------------------------------------ the step itself

    def _loss(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss to backpropagate, per-sample losses (B,)); flips chosen on device."""
        flip = x["flip"]
        batch = {k: torch.where(flip.view(-1, *[1] * (x[k].dim() - 1)), x[f"{k}_flip"], x[k])
                 for k in ("mean", "std", "time_ids")}  # fmt: skip
        batch.update(prompt_embeds=x["prompt_embeds"], pooled=x["pooled"],
                     empty_embeds=self.empty[0], empty_pooled=self.empty[1])  # fmt: skip
        if self.text is not None:  # instead of the cached embeddings: the ids encoded now
            batch.update(self.text.conditioning(x))
        rnd = StepNoise(x["latent"], x["noise"], x["timesteps"], x["drop_caption"], flip)
        per_sample = self.loss_fn(self.model, batch, rnd, self.schedule, self.cfg, self.dtype)
        return (per_sample * x["weight"]).sum(), per_sample.detach()

    def accumulate(self, x: dict[str, torch.Tensor], slot: int) -> None:
        """Forward + backward of one micro-batch; its per-sample losses go to its loss rows."""
        loss, per_sample = self.loss_of(x)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.losses[slot, self.rows].copy_(per_sample)

    @torch.no_grad()
    def update(self) -> None:
        """Sum over ranks, unscale, clip, flag non-finite gradients, step unless flagged."""
        distributed.all_reduce_sum_(self.flat)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.grad_norm.copy_(norm)
        self.found_inf.copy_(torch.logical_not(torch.isfinite(norm)))
        if skips_on_device(self.optimizer):
            self.optimizer.step()  # the fused kernel reads found_inf: no host sync
        elif not self.found_inf.item():  # 8-bit AdamW has no device-side skip: one sync
            self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        if self.ema:
            self.ema.update(skip=self.found_inf)

    def run(self, micro: list[dict[str, torch.Tensor]]) -> None:
        """The update, eagerly: zero_grad(set_to_none=False) as one kernel, then the rest."""
        self.flat.zero_()
        for slot, x in enumerate(micro):
            self.accumulate(x, slot)
        self.update()

    def replay(self, x: dict[str, torch.Tensor]) -> None:
        """The update through this bucket's CUDA graph: warm up eagerly, capture once, replay."""
        key = tuple(x["mean"].shape)
        graph = self.graphs.get(key)
        if graph is None:
            self.warm[key] = self.warm.get(key, 0) + 1
            if self.warm[key] <= GRAPH_WARMUP:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.run([x])
                torch.cuda.current_stream().wait_stream(side)
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # records only; replayed below
                self.run([x])
            self.graphs[key] = graph
        graph.replay()


def train_step(step: TrainStep, micro: list[dict[str, torch.Tensor]]) -> StepResult:
    """One optimizer update over the staged micro-batches `micro`; no host sync inside.

    The returned tensors are copies: the step's own buffers are overwritten by the next step.
    """
    if step.use_graphs:
        step.replay(micro[0])
    else:
        step.run(micro)
    return StepResult(step.losses[: len(micro)].clone(), step.grad_norm.clone(),
                      step.found_inf.clone())  # fmt: skip


def _auto(flag: bool | None, device: torch.device) -> bool:
    """None means: on for CUDA, off on the CPU."""
    return device.type == "cuda" if flag is None else flag
