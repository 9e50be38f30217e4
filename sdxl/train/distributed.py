"""Multi-process training under torchrun: which device this rank uses and how grads are summed.

LoRA gradients are small, so they are summed with one all_reduce per optimizer step instead of
wrapping the UNet in DDP; each rank's loss is already divided by the global (real) sample
count, so the sum equals single-process training on the same global batch.
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


def all_reduce_sum_(flat: torch.Tensor) -> None:
    """Sum one flat buffer (the step's gradients and loss rows) over ranks, in place.

    One collective per optimizer step, on a preallocated buffer: no concatenation or copies,
    and capturable in a CUDA graph (NCCL). A rank whose rows were all padding sends zeros.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
