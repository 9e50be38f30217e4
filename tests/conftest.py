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


@pytest.fixture
def fake_hub(tiny_dir, monkeypatch):
    """The Hub, offline: every download gets the tiny SDXL's files. Yields the repo ids asked
    for and the file sizes the 'Hub' reports (edit them to fake an interrupted download)."""
    from types import SimpleNamespace

    from sdxl import prepare

    hub = SimpleNamespace(calls=[], sizes={})

    def download(local_dir, repo_id, revision, variant, weights=True, retries=5):
        hub.calls.append(repo_id)
        for name in prepare.list_files(tiny_dir):
            (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / name).write_bytes((tiny_dir / name).read_bytes())
        return local_dir

    hub.sizes.update({n: (tiny_dir / n).stat().st_size for n in prepare.list_files(tiny_dir)})
    monkeypatch.setattr("sdxl.hub.download_sdxl", download)
    monkeypatch.setattr(
        prepare, "hub_sizes", lambda repo, files, rev: {f: hub.sizes[f] for f in files}
    )
    return hub


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    """UNet inputs for the tiny config: latents, timesteps, context, pooled text, time ids."""
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 8, 64, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 4, 0, 16, 16]])
    return sample, torch.tensor([10.0, 500.0]), context, text_embeds, time_ids


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
    from sdxl.models.configs import TINY, UNetConfig
    from sdxl.models.unet import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"])).state_dict()
