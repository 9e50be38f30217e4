r"""Train an SDXL LoRA; flags and defaults follow the original project's train_sdxl.py.

Example (CPU, tiny model, bundled dataset):
    uv run python train_sdxl.py --data_dir examples/shapes --pretrained_model builtin:tiny \
        --image_size 128 --num_epochs 2 --precision fp32 --output_dir outputs
Multi-GPU: torchrun --nproc_per_node 4 train_sdxl.py ...
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from types import NoneType

from sdxl.cli.errors import add_debug_flag, one_line_errors
from sdxl.errors import UserError
from sdxl.train.config import OPTIONAL, TYPES, TrainConfig
from sdxl.train.sample_prompts import read_prompt_lines


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig setting (its help, choices and names are the field's), and the
    few flags that are not settings."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset_config", default=None, type=Path,
                   help="kohya's dataset config TOML ([general], [[datasets]], "
                   "[[datasets.subsets]]): several folders with num_repeats, caption rules, "
                   "is_reg; its resolution and batch_size win (instead of --data_dir)")  # fmt: skip
    for f in fields(TrainConfig):
        flags = f.metadata["flags"]
        if flags != ():
            p.add_argument(*(flags or [f"--{f.name}"]), dest=f.name, **setting_argument(f))
    p.add_argument("--use_lora", action="store_true", default=True,
                   help="always on (kept for compatibility)")  # fmt: skip
    add_debug_flag(p)
    return p


def setting_argument(f: Field) -> dict:
    """argparse's arguments for a setting's flag, from its type, default and description."""
    kind, optional, meta = TYPES[f.name], f.name in OPTIONAL, f.metadata
    if optional:  # X | None: an X, or unset
        kind = next(k for k in typing.get_args(kind) if k is not NoneType)
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    args = {"default": default, "help": meta["help"] or None}
    if kind is bool:  # off by default: a switch; on (or unset): --x / --no-x
        switch = f.default is False and not optional
        args["action"] = "store_true" if switch else argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        args["nargs"] = "*"
    elif kind is not str:
        args["type"] = kind
    if meta["choices"]:
        args["choices"] = meta["choices"]
    return {**args, **meta["cli"]}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values.pop("use_lora")
    values.pop("debug")
    values.update(dataset_settings(values.pop("dataset_config"), values["data_dir"]))
    if values["sample_prompts"]:  # the file is recorded in config.json with its lines
        flag = "--validation_caption_file/--sample_prompts"
        values["validation_prompts"] = read_prompt_lines(values["sample_prompts"], flag)
    return TrainConfig.from_dict(values)


def dataset_settings(path: Path | None, data_dir: str) -> dict:
    """The subsets (and resolution and batch size, where set) of --dataset_config."""
    if path is None:
        if not data_dir:
            raise UserError("pass --data_dir (an image+caption folder) or --dataset_config")
        return {}
    if data_dir:
        raise UserError(f"--data_dir {data_dir} and --dataset_config {path}: pass one of them "
                        "(the config's [[datasets.subsets]] name the image folders)")  # fmt: skip
    from sdxl.dataset_config import read_dataset_config

    config = read_dataset_config(path)
    values = {"subsets": config.subsets}
    if config.resolution is not None:
        values["image_size"] = config.resolution
    if config.batch_size is not None:
        values["batch_size"] = config.batch_size
    return values


def main(argv: list[str] | None = None) -> int:
    """Parse, train, print where the LoRA is; expected failures end as one `error:` line."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    with one_line_errors(args.debug):
        cfg = config_from_args(args)
        from sdxl.train.loop import train

        out = train(cfg)
    print(f"done: {out / 'lora_final.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
