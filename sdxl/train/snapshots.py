"""Intermediate LoRA files: `<output_name>-stepNNNNNNNN.safetensors`, loadable like the final one.

Which snapshots a run of `total` steps keeps is a function of its settings alone (`wanted_steps`),
so a run continued from a checkpoint ends with exactly the files a straight run writes.
"""

from __future__ import annotations

import math
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


def wanted_steps(cfg: TrainConfig, step: int, steps_per_epoch: int) -> list[int]:
    """The snapshots on disk once a run has done `step` steps: every save_every_n_steps and the
    end of every save_every_n_epochs-th epoch up to `step`, only the newest save_last_n. So a
    checkpoint at step c can be continued exactly iff wanted_steps(cfg, c, ...) are all there."""
    every = cfg.save_every_n_steps
    steps = set(range(every, step + 1, every)) if every else set()
    steps |= set(epoch_end_steps(cfg.save_every_n_epochs, steps_per_epoch, step))
    steps = sorted(steps)
    return steps[-cfg.save_last_n :] if cfg.save_last_n else steps


def epoch_end_steps(every_epochs: int, steps_per_epoch: int, last: int) -> list[int]:
    """The steps at which every `every_epochs`-th epoch ends, up to step `last` (0: none)."""
    if not every_epochs or not steps_per_epoch:
        return []
    return list(range(every_epochs * steps_per_epoch, last + 1, every_epochs * steps_per_epoch))


def optimizer_steps_per_epoch(batches: int, accumulation: int) -> int:
    """Optimizer steps of an epoch of `batches` batches (the trainer's, and the grids' from a
    finished run's header: the same epoch ends)."""
    return math.ceil(batches / accumulation)


def grid_files(snapshots: dict[int, Path], final: Path, final_meta: dict[str, str],
               every_steps: int, every_epochs: int) -> dict[int, Path | None]:  # fmt: skip
    """step -> LoRA file of the grids drawn from a finished run (None: the base model, step 0):
    the snapshots every `every_steps` steps and at every `every_epochs`-th epoch's end, and the
    final LoRA. `final_meta` is the final file's kohya header (steps, batches per epoch)."""
    last = int(final_meta["ss_steps"])
    batches = int(final_meta["ss_num_batches_per_epoch"])
    accumulation = int(final_meta["ss_gradient_accumulation_steps"])
    per_epoch = optimizer_steps_per_epoch(batches, accumulation)
    wanted = set(range(every_steps, last + 1, every_steps)) if every_steps else set()
    wanted |= set(epoch_end_steps(every_epochs, per_epoch, last))
    files: dict[int, Path | None] = {s: p for s, p in snapshots.items() if s in wanted}
    files.setdefault(last, final)  # the snapshot of the last step is the same LoRA
    return {0: None, **files}


def prune_snapshots(output_dir: Path, name: str, keep: set[int]) -> list[Path]:
    """Delete the snapshots whose step is not in `keep`."""
    removed = []
    for step, path in list_snapshots(output_dir, name).items():
        if step not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
