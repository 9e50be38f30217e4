"""Training checkpoints: LoRA, optimizer, EMA, loss scaler, RNG and data position, atomically."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdxl.utils import atomic_path

CHECKPOINT_DIR = "checkpoints"
FINAL = "checkpoint_final.pt"


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done; `epoch` and the step within it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file, then rename: a killed job never leaves a half checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True; a broken file gets an error that says what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"{path}: cannot read this checkpoint ({err}); delete it to resume from an earlier "
            "one, or pass --resume_from none to start over"
        ) from err


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"checkpoint-step{step:07d}.pt"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The final checkpoint if the run finished, else the step checkpoint with the most steps."""
    if (output_dir / FINAL).exists():
        return output_dir / FINAL
    found = sorted(
        (int(m.group(1)), p)
        for p in (output_dir / CHECKPOINT_DIR).glob("checkpoint-step*.pt")
        if (m := re.fullmatch(r"checkpoint-step(\d+)\.pt", p.name))
    )
    return found[-1][1] if found else None


def position_dict(pos: Position) -> dict:
    return asdict(pos)
