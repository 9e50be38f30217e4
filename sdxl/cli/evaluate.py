r"""Score a generated dataset: FID and KID against a reference image folder, and CLIP score.

Numbers follow torchmetrics (FrechetInceptionDistance, KernelInceptionDistance, CLIPScore) with
torch-fidelity's FID InceptionV3. Weights are downloaded on first use: the Inception into
$SDXL_CACHE_DIR (default ~/.cache/sdxl-pipeline), CLIP into the Hugging Face cache.

Example:
    uv run python evaluate_images.py --images generated --reference coco/val2014 \
        --output generated/metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdxl.cli.errors import add_debug_flag, one_line_errors
from sdxl.evaluate.clip import DEFAULT_CLIP
from sdxl.evaluate.features import FeatureConfig
from sdxl.evaluate.inception import DEFAULT_INCEPTION, TINY_INCEPTION
from sdxl.evaluate.run import evaluate_folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", required=True,
                   help="generated dataset folder (captions.json, or .txt captions, give the prompts)")  # fmt: skip
    p.add_argument(
        "--reference", required=True, help="folder of real images (searched recursively)"
    )
    p.add_argument("--inception", default=DEFAULT_INCEPTION,
                   help=f"{DEFAULT_INCEPTION!r} (FID weights), {TINY_INCEPTION!r}, or a weights file")  # fmt: skip
    p.add_argument("--clip-model", default=DEFAULT_CLIP,
                   help="Hub repo id, local folder or builtin:tiny-clip; 'none' skips the CLIP score")  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller set")
    p.add_argument("--output", default="metrics.json")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_errors(args.debug):
        cfg = config_from_args(args)
        metrics = evaluate_folders(args.images, args.reference, cfg, args.output,
                                   args.kid_subsets, args.kid_subset_size)  # fmt: skip
    keys = ("n_images", "fid", "kid_mean", "kid_std", "clip_score")
    print(json.dumps({k: metrics[k] for k in keys}))
    print(f"metrics written to {args.output}")
    return 0


def config_from_args(args: argparse.Namespace) -> FeatureConfig:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise ValueError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = None if args.clip_model.lower() == "none" else args.clip_model
    return FeatureConfig(inception=args.inception, clip_model=clip, batch_size=args.batch_size,
                         device=device)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
