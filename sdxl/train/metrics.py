"""metrics.csv (always) and Weights & Biases (when a project is set; offline mode works)."""

from __future__ import annotations

import csv
from pathlib import Path

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
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "--wandb_project needs wandb: install it with `uv sync --extra wandb`"
                ) from None
            self.wandb = wandb.init(
                project=wandb_project, name=run_name, config=config, resume="allow"
            )

    def log(self, row: dict) -> None:
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
