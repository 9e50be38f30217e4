"""metrics.csv (always), TensorBoard and Weights & Biases (as --report_to says).

The W&B run id is kept in output_dir/wandb-run-id, so a resumed run continues the same W&B run
instead of opening a new one; TensorBoard drops the events past the resumed step (purge_step),
so a resumed run's curves have no repeated steps, as metrics.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sdxl.errors import UserError
from sdxl.utils import atomic_write_text

RUN_ID_FILE = "wandb-run-id"

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "peak_mem_gb", "skipped")


class MetricsLog:
    """Append rows to metrics.csv; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int, trackers: set[str] = frozenset(),
                 config: dict | None = None, *, wandb_project: str | None = None,
                 run_name: str | None = None, logging_dir: Path | None = None):  # fmt: skip
        self.path = path
        rows = []
        if resume_step and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.wandb = self.tensorboard = None
        if "wandb" in trackers:
            project = wandb_project or "sdxl-pipeline"
            self.wandb = _wandb_run(path.parent, resume_step, project, run_name, config or {})
        if "tensorboard" in trackers:
            self.tensorboard = _tensorboard(logging_dir or path.parent / "logs", resume_step)

    def log(self, row: dict) -> None:
        """Append one row to metrics.csv (and send it to the trackers)."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})
        scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and v != ""}
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, float(value), row["step"])

    def log_images(self, step: int, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation/grid": wandb.Image(str(path))}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image("validation/grid", pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(folder: Path, resume_step: int):
    """A SummaryWriter in `folder` that forgets the events past `resume_step`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--report_to tensorboard needs tensorboard: install it with `uv sync --extra "
            "tensorboard`, or pass --report_to none"
        ) from None
    return SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)


def _wandb_run(folder: Path, resume_step: int, project: str, name: str | None, config: dict):
    """A W&B run: the saved one when resuming (same id), else a new one whose id is saved."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            "--wandb_project needs wandb: install it with `uv sync --extra wandb`"
        ) from None
    id_file = folder / RUN_ID_FILE
    run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
    run = wandb.init(project=project, name=name, config=config, id=run_id, resume="allow")
    atomic_write_text(id_file, f"{run.id}\n")
    return run
