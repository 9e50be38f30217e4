"""Shared fixtures: the tiny SDXL folder is written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models: one thread is fastest, and leaves the other core to parallel test processes.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A freshly written tiny SDXL in diffusers layout (also what `builtin:tiny` resolves to)."""
    from sdxl.tiny import write_tiny_sdxl

    folder = write_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")
    os.environ["SDXL_TINY_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def cluster():
    """The test SLURM cluster (tests/cluster), shared by the SLURM test modules (one xdist
    group). One runs per machine at a time (see cluster_or_skip)."""
    from tests.cluster.slurm_cluster import cluster_or_skip

    with cluster_or_skip() as running:
        yield running


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    """Seeded random weights of the tiny UNet (the LoRA and fused-attention tests share them)."""
    from sdxl.models.configs import TINY
    from sdxl.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    return UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"])).state_dict()
