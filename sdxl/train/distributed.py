"""Multi-process training under torchrun: which device this rank uses and how grads are summed.

LoRA gradients are small, so they are summed with one all_reduce per optimizer step instead of
wrapping the UNet in DDP; each rank's loss is already divided by the global sample count, so
the sum equals single-process training on the same global batch exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sdxl.errors import UserError
from sdxl.procs import die_with_parent


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        die_with_parent()  # a torchrun rank: killing torchrun (or its parent) kills the rank
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, dev)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks (one flat buffer, one collective).

    A rank that had no sample in this step (its share of a short batch was empty) has no
    gradients yet: it sends zeros, so every rank joins the same collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over all ranks' samples (for logging the loss of the global batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values.mean()
    total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    dist.all_reduce(total)
    return total[0] / total[1]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
