"""Training checkpoints: LoRA, optimizer, EMA, loss scaler, RNG and data position, atomically."""

from __future__ import annotations

import errno
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdxl.errors import UserError
from sdxl.train.hooks import pause_point
from sdxl.utils import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL = "checkpoint_final.pt"
REQUIRED = ("lora", "optimizer", "scaler", "rng", "position", "config")


class CheckpointError(UserError):
    """A checkpoint file cannot be used; the message says which and what to do."""


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done; `epoch` and the step within it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file, then rename: a killed job never leaves a half checkpoint.

    A full disk (torch reports it as ENOSPC or as its own `unexpected pos` RuntimeError) is a
    CheckpointError naming the folder and the space needed; the temp file is removed and the
    previous checkpoints are untouched.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
            pause_point(f"checkpoint:{path.name}")
    except (OSError, RuntimeError) as err:
        need = state_nbytes(state)
        if not _out_of_space(err, path.parent, need):
            raise
        raise CheckpointError(
            f"{path.parent}: no space left on the device to write {path.name} (a checkpoint "
            f"needs about {need / 2**20:.1f} MiB, {_free(path.parent) / 2**20:.1f} MiB free); "
            "free some space and rerun to resume from the last checkpoint, or use another "
            "--output_dir"
        ) from err


def state_nbytes(state: object) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about its size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _out_of_space(err: Exception, folder: Path, need: int) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _free(folder) < need  # torch's writer hides the errno in a RuntimeError


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True; a broken file gets an error that says what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({str(err).splitlines()[0]}); delete it to "
            "resume from an earlier one, or pass --resume_from none to start over"
        ) from err
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this tool (no {', '.join(missing)}); pass a "
            "checkpoint-step*.pt or checkpoint_final.pt, or --resume_from none to start over"
        )
    return state


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


_STEP_FILE = re.compile(r"checkpoint-step(\d+)\.pt")


def step_checkpoints(output_dir: Path) -> dict[int, Path]:
    """step -> file of the step checkpoints in output_dir/checkpoints, oldest first."""
    found = {int(m[1]): p for p in (output_dir / CHECKPOINT_DIR).glob("checkpoint-step*.pt")
             if (m := _STEP_FILE.fullmatch(p.name))}  # fmt: skip
    return dict(sorted(found.items()))


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    """The final checkpoint (if the run finished), then step checkpoints, most steps first.

    The final one exists only while it is the newest: a run that continues past it renames it
    to its step checkpoint first (`retire_final`).
    """
    final = [output_dir / FINAL] if (output_dir / FINAL).is_file() else []
    return final + list(reversed(step_checkpoints(output_dir).values()))


def checkpoint_step(path: Path) -> int | None:
    """The step in a step checkpoint's name (None for the final checkpoint)."""
    match = _STEP_FILE.fullmatch(path.name)
    return int(match[1]) if match else None


def load_newest_checkpoint(output_dir: Path, usable=lambda path, state: True
                           ) -> tuple[Path, dict] | None:  # fmt: skip
    """The newest readable checkpoint for which usable(path, state); unreadable ones are skipped
    with a warning, unusable ones silently (usable says why in the log)."""
    for path in checkpoints_newest_first(output_dir):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        if usable(path, state):
            return path, state
    return None


def retire_final(output_dir: Path, step: int) -> None:
    """The run continues past checkpoint_final.pt: keep it as the step checkpoint it is."""
    final = output_dir / FINAL
    if final.is_file():
        target = step_checkpoint_path(output_dir, step)
        target.parent.mkdir(parents=True, exist_ok=True)
        final.replace(target)


def remove_checkpoints(output_dir: Path, after: int | None = None) -> None:
    """Delete a run's checkpoints (None), or its step checkpoints past step `after`: a run that
    starts over, or continues from an earlier step, must never resume from them."""
    if after is None:
        (output_dir / FINAL).unlink(missing_ok=True)
    for step, path in step_checkpoints(output_dir).items():
        if after is None or step > after:
            path.unlink(missing_ok=True)


def keep_newest_checkpoints(output_dir: Path, n: int) -> None:
    """Delete all but the newest `n` step checkpoints (n = 0 keeps all)."""
    if n:
        for path in list(step_checkpoints(output_dir).values())[:-n]:
            path.unlink(missing_ok=True)


def position_dict(pos: Position) -> dict:
    return asdict(pos)
