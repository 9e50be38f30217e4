"""metrics.csv (always) and Weights & Biases (when a project is set; offline mode works).

The W&B run id is kept in output_dir/wandb-run-id, so a resumed run continues the same W&B run
instead of opening a new one.
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

    def __init__(
        self,
        path: Path,
        resume_step: int,
        wandb_project: str | None,
        run_name: str | None,
        config: dict,
    ):
        self.path = path
        rows = []
        if resume_step and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.wandb = None
        if wandb_project:
            self.wandb = _wandb_run(path.parent, resume_step, wandb_project, run_name, config)

    def log(self, row: dict) -> None:
        """Append one row to metrics.csv (and send it to W&B)."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})
        if self.wandb is not None:
            self.wandb.log(
                {f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"]
            )

    def log_images(self, step: int, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation/grid": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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
