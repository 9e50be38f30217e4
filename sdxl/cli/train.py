"""Train an SDXL LoRA; flags and defaults follow the original project's train_sdxl.py.

Example (CPU, tiny model, bundled dataset):
    uv run python train_sdxl.py --data_dir examples/shapes --pretrained_model builtin:tiny \
        --image_size 128 --num_epochs 2 --precision fp32 --output_dir outputs
Multi-GPU: torchrun --nproc_per_node 4 train_sdxl.py ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdxl.cli.errors import add_debug_flag, one_line_errors
from sdxl.errors import UserError
from sdxl.train.config import (
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    PREDICTIONS,
    REPORT_TO,
    TrainConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = TrainConfig(data_dir="")
    a = p.add_argument
    a("--data_dir", default="",
      help="image+caption folder, or a cache folder built by the pipeline (or --dataset_config)")  # fmt: skip
    a("--dataset_config", default=None, type=Path,
      help="kohya's dataset config TOML ([general], [[datasets]], [[datasets.subsets]]): several "
      "folders with num_repeats, caption rules, is_reg; its resolution and batch_size win")  # fmt: skip
    a("--prior_loss_weight", type=float, default=d.prior_loss_weight,
      help="loss weight of regularization (is_reg) images, kohya's")  # fmt: skip
    a(
        "--pretrained_model",
        default=d.pretrained_model,
        help="diffusers SDXL folder, Hugging Face repo id (downloaded once), single-file "
        ".safetensors (converted once into ~/.cache/sdxl-pipeline/models) or builtin:tiny",
    )
    a(
        "--config_source",
        default=None,
        help="single files: a diffusers folder or Hub id with the configs and tokenizers "
        "(default: SDXL base 1.0's, fetched once)",
    )
    a("--vae_model", default=None, help="optional diffusers VAE folder used to encode the latents")
    a("--output_dir", default=d.output_dir)
    a("--use_lora", action="store_true", default=True, help="always on (kept for compatibility)")
    a("--lora_rank", type=int, default=d.lora_rank)
    a("--lora_alpha", type=float, default=d.lora_alpha)
    a("--lora_dropout", type=float, default=d.lora_dropout)
    a(
        "--lora_target_mode",
        default=d.lora_target_mode,
        choices=["attention", "attention_out", "all"],
    )
    a(
        "--lora_targets",
        nargs="+",
        default=[],
        help="regexes over UNet module paths (overrides the mode)",
    )
    a("--lora_conv", action="store_true", help="also train LoRA on resnet convs (LoCon)")
    a(
        "--lora_type",
        default=d.lora_type,
        choices=["lora", "dora"],
        help="dora: weight-decomposed LoRA (DoRA, LyCORIS dora_wd), saved with dora_scale keys",
    )
    a("--batch_size", type=int, default=d.batch_size)
    a("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    a("--num_epochs", type=int, default=d.num_epochs)
    a("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--learning_rate", type=float, default=d.learning_rate)
    a("--lr_scheduler", default=d.lr_scheduler, choices=LR_SCHEDULES)
    a(
        "--lr_scheduler_num_cycles",
        type=int,
        default=d.lr_scheduler_num_cycles,
        help="cosine_with_restarts: how many times the cosine starts again from the base rate",
    )
    a(
        "--lr_scheduler_power",
        type=float,
        default=d.lr_scheduler_power,
        help="polynomial: the decay's power (1: linear)",
    )
    a("--warmup_steps", type=int, default=d.warmup_steps)
    a("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    a("--adam_beta1", type=float, default=d.adam_beta1)
    a("--adam_beta2", type=float, default=d.adam_beta2)
    a("--adam_epsilon", type=float, default=d.adam_epsilon)
    a("--8_bit_adam", dest="use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    a(
        "--optimizer",
        default=d.optimizer,
        choices=OPTIMIZERS,
        help="adamw (torch, fused), adamw8bit (bitsandbytes), prodigy (prodigyopt), adafactor "
        "(torch), lion (lion-pytorch); `uv sync --extra optimizers` installs the packages",
    )
    a(
        "--optimizer_args",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra optimizer arguments as kohya writes them, e.g. d_coef=2.0 decouple=True",
    )
    a("--max_grad_norm", type=float, default=d.max_grad_norm, help="<= 0 disables clipping")
    a("--precision", default=d.precision, choices=PRECISIONS)
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    a(
        "--checkpointing_mode",
        default=d.checkpointing_mode,
        choices=["full", "selective"],
        help="with --gradient_checkpointing: recompute whole blocks, or keep attention outputs",
    )
    a("--fused_qkv", action="store_true", help="run each attention's q/k/v as one GEMM")
    a(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training step (default: on for CUDA, off on the CPU)",
    )
    a(
        "--compile_mode",
        default=d.compile_mode,
        choices=["full", "regional"],
        help="full: the whole loss as one graph; regional: each transformer block and resnet",
    )
    a(
        "--cuda_graphs",
        action=argparse.BooleanOptionalAction,
        default=d.cuda_graphs,
        help="replay each bucket's whole step as one CUDA graph (opt-in until verified on a GPU)",
    )
    a("--use_ema", action="store_true")
    a("--ema_decay", type=float, default=d.ema_decay)
    a(
        "--prediction_type",
        default=None,
        choices=PREDICTIONS,
        help="the model's objective (default: what its scheduler_config.json says)",
    )
    a(
        "--min_snr_gamma",
        type=float,
        default=None,
        help="min-SNR-gamma weighting (off unless set; 5 is usual)",
    )
    a("--noise_offset", type=float, default=d.noise_offset)
    a(
        "--caption_dropout",
        "--caption_dropout_rate",
        dest="caption_dropout",
        type=float,
        default=d.caption_dropout,
        help="probability of an empty caption",
    )
    a("--train_text_encoder", action="store_true",
      help="also train a LoRA on both text encoders (kohya's; text is then encoded each step)")  # fmt: skip
    a("--text_encoder_lr", type=float, default=None,
      help="the text encoders' LoRA learning rate (default: --learning_rate)")  # fmt: skip
    a("--unet_lr", type=float, default=None,
      help="the UNet LoRA's learning rate (default: --learning_rate)")  # fmt: skip
    a("--shuffle_caption", action="store_true",
      help="shuffle each caption's comma-separated tags every time it is seen (kohya's)")  # fmt: skip
    a("--keep_tokens", type=int, default=d.keep_tokens,
      help="with --shuffle_caption: keep the first N tags in front")  # fmt: skip
    a("--timestep_min", type=int, default=d.timestep_min)
    a(
        "--timestep_max",
        type=int,
        default=None,
        help="exclusive upper timestep (default: the schedule's num_train_timesteps)",
    )
    a(
        "--image_size",
        type=int,
        default=d.image_size,
        help="bucket area = image_size^2 (512 or 1024 families)",
    )
    a("--center_crop", action="store_true", help="center crop instead of random crop")
    a("--random_flip", action=argparse.BooleanOptionalAction, default=True)
    a("--min_image_size", type=int, default=d.min_image_size)
    a(
        "--strict_data",
        action="store_true",
        help="fail on any bad dataset item instead of skipping it",
    )
    a("--save_interval", type=int, default=d.save_interval, help="checkpoint every N epochs")
    a(
        "--checkpoint_steps",
        type=int,
        default=d.checkpoint_steps,
        help="checkpoint every N steps (0: off)",
    )
    a(
        "--save_every_n_steps",
        type=int,
        default=d.save_every_n_steps,
        help="also write <output_name>-stepNNNNNNNN.safetensors every N steps (0: off)",
    )
    a("--save_every_n_epochs", type=int, default=d.save_every_n_epochs,
      help="also write that snapshot at the end of every N epochs (kohya's; 0: off)")  # fmt: skip
    a(
        "--save_last_n",
        type=int,
        default=d.save_last_n,
        help="keep only the newest N snapshots and step checkpoints (0: all)",
    )
    a("--output_name", default=d.output_name, help="file name prefix of the snapshots")
    a(
        "--resume_from",
        default="auto",
        help="checkpoint path, 'auto' (the newest in output_dir that this run can continue: "
        "a longer run continues a shorter one) or 'none'",
    )
    a("--log_interval", type=int, default=d.log_interval)
    a(
        "--report_to",
        default=d.report_to,
        choices=REPORT_TO,
        help="where metrics (and validation grids) go besides metrics.csv; --wandb_project "
        "alone also means wandb",
    )
    a("--logging_dir", default=None, help="TensorBoard's folder (default: output_dir/logs)")
    a("--wandb_project", default=None)
    a("--wandb_run_name", default=None)
    a(
        "--validation_caption_file",
        "--sample_prompts",
        default=None,
        help="prompts for sample grids, one per line, each may end with kohya's --n negative "
        "--w W --h H --d seed --s steps --l cfg (--sample_prompts: kohya's name)",
    )
    a(
        "--validation_interval",
        type=int,
        default=d.validation_interval,
        help="steps between grids (0: off; grids at step 0 and the end come with any prompts)",
    )
    a("--sample_every_n_steps", type=int, default=d.sample_every_n_steps,
      help="kohya's name for --validation_interval")  # fmt: skip
    a("--sample_every_n_epochs", type=int, default=d.sample_every_n_epochs,
      help="also a grid at the end of every Nth epoch (0: off)")  # fmt: skip
    a("--num_validation_images", type=int, default=d.num_validation_images)
    a("--validation_guidance_scale", type=float, default=d.validation_guidance_scale)
    a("--validation_steps", type=int, default=d.validation_steps)
    a("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, default=d.seed)
    add_debug_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values.pop("use_lora")
    values.pop("debug")
    values.update(dataset_settings(values.pop("dataset_config"), values["data_dir"]))
    prompts_file = values.pop("validation_caption_file")
    if prompts_file:
        values["validation_prompts"] = read_validation_prompts(Path(prompts_file))
        values["sample_prompts"] = prompts_file  # recorded in config.json with its lines
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


def read_validation_prompts(path: Path) -> list[str]:
    """The prompt lines of --validation_caption_file / --sample_prompts (kohya's format: # lines
    are comments); errors name the flag and the file's line."""
    from sdxl.train.sample_prompts import read_prompt_lines

    if not path.is_file():
        raise UserError(
            f"--validation_caption_file {path}: no such file; pass an existing text file with "
            "one prompt per line, or leave the flag out"
        )
    return read_prompt_lines(path, flag="--validation_caption_file")


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
