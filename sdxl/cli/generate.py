r"""Generate an image dataset with SDXL (optionally with LoRAs); flags follow the original project.

Example:
    uv run python generate_images.py --pretrained-model builtin:tiny \
        --prompt "a red circle on a white background" --num-images 4 --output-dir generated
"""

from __future__ import annotations

import argparse
import logging
import sys

from sdxl.cli.errors import add_debug_flag, one_line_errors
from sdxl.generate.coco_prompts import COCO_MODES
from sdxl.generate.dataset import generate_dataset
from sdxl.generate.prompts import expand_prompts, load_prompts
from sdxl.generate.run import GenerateConfig
from sdxl.sampling.samplers import SAMPLERS


def parse_size(text: str) -> tuple[int, int]:
    """'N' or 'WxH' -> (width, height)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"--image-size must be N or WxH (e.g. 1024 or 1152x896), got {text!r}"
        )
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pretrained-model",
        default="./weights/sdxl-base-1.0",
        help="diffusers folder, single-file .safetensors, or builtin:tiny",
    )
    p.add_argument(
        "--lora-checkpoint",
        action="append",
        default=[],
        help="LoRA file (kohya .safetensors, lora_final.pt, PEFT); repeatable",
    )
    p.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        help="multiplier per --lora-checkpoint, in the same order (default 1.0)",
    )
    p.add_argument(
        "--no-merge-lora",
        action="store_true",
        help="keep LoRAs as separate layers instead of merging them into the weights",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt, used for every image")
    prompt.add_argument(
        "--prompt-file",
        help="text file, one prompt per line (blank lines skipped), or a COCO captions file "
        "(captions_val2017.json)",
    )
    p.add_argument(
        "--coco-captions",
        default="first",
        choices=COCO_MODES,
        help="with a COCO captions file: one image per COCO image with its first caption, one "
        "per caption (all), or one per image with a seeded random caption; taken in a seeded "
        "shuffled order, the first --num-images of it (default: first)",
    )
    p.add_argument("--negative-prompt", default="", help="empty = zero embeddings, as SDXL base")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--shuffle-prompts", action="store_true")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass per device")
    p.add_argument("--image-size", type=parse_size, default=(1024, 1024), help="N or WxH")
    p.add_argument("--num-inference-steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="euler", choices=sorted(SAMPLERS))
    p.add_argument("--output-dir", default="./generated_images")
    p.add_argument(
        "--output-format",
        default="coco",
        choices=["coco", "simple", "webdataset"],
        help="coco: numbered PNG + .txt, captions.json, metadata.jsonl; simple: PNGs only; "
        "webdataset: the coco folder plus webdataset/shard-NNNNNN.tar (.png + .txt + .json each)",
    )
    p.add_argument(
        "--shard-size", type=int, default=1000, help="images per tar for --output-format webdataset"
    )
    p.add_argument("--save-metadata", action="store_true", help="also write NNNNN.json per image")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-gpus", type=int, default=None, help="worker count (default: all GPUs)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed + i")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the UNet and VAE and replay each step as a CUDA graph "
        "(default: on for CUDA, off on CPU)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="NHWC UNet/VAE weights (may be faster on GPUs)"
    )
    p.add_argument(
        "--fused-qkv", action="store_true", help="run each attention's q/k/v as one GEMM"
    )
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_errors(args.debug):
        cfg = config_from_args(args)
        made = generate_dataset(cfg, args.num_gpus)
    total = len(cfg.prompts)
    print(f"{made} new images in {args.output_dir} ({total - made} were already there)")
    return 0


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give a prompt")
    if args.prompt is not None:
        prompts, sources = expand_prompts([args.prompt], args.num_images), []
    else:
        prompts, sources = load_prompts(args.prompt_file, args.num_images,
                                        shuffle=args.shuffle_prompts, seed=args.seed,
                                        coco_captions=args.coco_captions)  # fmt: skip
    if len(args.lora_scale) > len(args.lora_checkpoint):
        raise ValueError("more --lora-scale values than --lora-checkpoint files")
    scales = args.lora_scale + [1.0] * (len(args.lora_checkpoint) - len(args.lora_scale))
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ValueError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    width, height = args.image_size
    return GenerateConfig(
        pretrained_model=args.pretrained_model, output_dir=args.output_dir, prompts=tuple(prompts),
        prompt_sources=tuple(sources), coco_captions=args.coco_captions,
        negative_prompt=args.negative_prompt, width=width, height=height,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        sampler=args.scheduler, seed=args.seed, batch_size=args.batch_size,
        precision=args.precision, device=args.device, save_metadata=args.save_metadata,
        output_format=args.output_format, webdataset_shard_size=args.shard_size,
        loras=tuple(zip(args.lora_checkpoint, scales, strict=True)),
        merge_loras=not args.no_merge_lora, compile=args.compile, channels_last=args.channels_last,
        fused_qkv=args.fused_qkv,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
