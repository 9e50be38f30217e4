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
