"""Intermediate LoRA files: `<output_name>-stepNNNNNNNN.safetensors`, loadable like the final one.

Which snapshots a run of `total` steps keeps is a function of its settings alone (`wanted_steps`),
so a run continued from a checkpoint ends with exactly the files a straight run writes.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdxl.train.config import TrainConfig


def snapshot_path(output_dir: Path, name: str, step: int) -> Path:
    return Path(output_dir) / f"{name}-step{step:08d}.safetensors"


def list_snapshots(output_dir: Path, name: str) -> dict[int, Path]:
    """step -> file of the snapshots in output_dir."""
    pattern = re.compile(re.escape(name) + r"-step(\d{8})\.safetensors")
    found = {}
    for path in Path(output_dir).glob(f"{name}-step*.safetensors"):
        if match := pattern.fullmatch(path.name):
            found[int(match[1])] = path
    return dict(sorted(found.items()))


def wanted_steps(cfg: TrainConfig, step: int) -> list[int]:
    """The snapshots on disk once a run has done `step` steps: every save_every_n_steps up to
    `step`, only the newest save_last_n. So a checkpoint at step c can be continued exactly iff
    wanted_steps(cfg, c) are all there."""
    every = cfg.save_every_n_steps
    steps = list(range(every, step + 1, every)) if every else []
    return steps[-cfg.save_last_n :] if cfg.save_last_n else steps


def prune_snapshots(output_dir: Path, name: str, keep: set[int]) -> list[Path]:
    """Delete the snapshots whose step is not in `keep`."""
    removed = []
    for step, path in list_snapshots(output_dir, name).items():
        if step not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
