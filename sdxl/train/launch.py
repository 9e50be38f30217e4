"""Run training in this process, or under torchrun with one process per GPU (DDP).

`python -m sdxl.train.launch config.json` is the entry point torchrun starts: it reads a
TrainConfig saved as JSON (TrainConfig.to_dict) and trains.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from sdxl.train.config import TrainConfig
from sdxl.utils import atomic_write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def torchrun_command(config_json: str | os.PathLike, num_gpus: int) -> list[str]:
    """The torchrun command line that trains `config_json` on `num_gpus` local GPUs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={num_gpus}", "-m", "sdxl.train.launch", str(config_json)]  # fmt: skip


def run_training(cfg: TrainConfig, num_gpus: int = 1) -> Path:
    """Train `cfg`: in this process for 0 or 1 GPU, else DDP over `num_gpus` via torchrun."""
    if num_gpus <= 1:
        from sdxl.train.loop import train

        return train(cfg)
    config_json = Path(cfg.output_dir) / "launch-config.json"
    atomic_write_text(config_json, json.dumps(cfg.to_dict(), indent=2))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log.info(
        "starting DDP training on %d GPUs: %s",
        num_gpus,
        " ".join(torchrun_command(config_json, num_gpus)),
    )
    subprocess.run(torchrun_command(config_json, num_gpus), check=True, env=env)
    return Path(cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sdxl.train.launch CONFIG.json", file=sys.stderr)
        return 2
    from sdxl.train.loop import train

    # Which rank runs where: a job's log then shows torchrun's processes on its devices.
    log.info("rank %s of %s, CUDA_VISIBLE_DEVICES=%s", os.environ.get("RANK", "0"),
             os.environ.get("WORLD_SIZE", "1"), os.environ.get("CUDA_VISIBLE_DEVICES", "-"))  # fmt: skip
    train(TrainConfig.from_dict(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
