r"""Speed and peak memory of sdxl's UNet, optionally next to diffusers' on the same weights and inputs.

Weights are random (diffusers' init, copied into ours); inputs are random latents, a 77-token
context, pooled text and SDXL size ids. Prints a markdown table for BENCHMARKS.md.

    python benchmarks/bench_unet.py --config sdxl --resolution 1024 --batch 1 4 --dtype bf16 \
        --mode both --compare diffusers --fused-qkv both
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py --config tiny --resolution 256 --batch 1 2 \
        --dtype fp32 --device cpu --compare diffusers --iters 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from harness import (  # noqa: E402
    TOKENS,
    PeakMemory,
    add_config_arg,
    add_device_args,
    add_ratios,
    add_timing_args,
    build_models,
    device_and_dtype,
    device_line,
    diffusers_forward,
    dtype_label,
    load_config,
    markdown_table,
    pooled_dim,
    set_checkpointing,
    square_time_ids,
    time_ms,
)

from sdxl.models.configs import UNetConfig  # noqa: E402
from sdxl.models.unet import CHECKPOINTING, UNet2DConditionModel  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    p.add_argument("--resolution", type=int, help="pixels (latent = /8); default sample_size*8")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    add_device_args(p)
    p.add_argument("--mode", choices=["forward", "train", "both"], default="forward")
    p.add_argument(
        "--grad-checkpointing",
        nargs="?",
        const="full",
        default="none",
        choices=list(CHECKPOINTING),
        help="train mode: none | full (the flag alone) | selective (ours; diffusers: full)",
    )
    p.add_argument(
        "--fused-qkv",
        choices=["on", "off", "both"],
        default="off",
        help="ours with fused QKV/KV projections (both: time unfused and fused); train mode "
        "here trains every weight, so fused concatenates per step (LoRA steps: bench_train)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    add_timing_args(p, warmup=2, iters=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def add_fused(models: dict, cfg: dict, which: str) -> dict:
    """--fused-qkv: fuse ours in place (on), or add a fused copy as impl "sdxl-fused" (both)."""
    if which == "off":
        return models
    if which == "on":
        models["sdxl"].fuse_qkv()
        return models
    ours = models["sdxl"]
    with torch.device("meta"):
        fused = UNet2DConditionModel(UNetConfig.from_dict(cfg))
    fused.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, assign=True)
    fused.fuse_qkv()
    return {"sdxl": ours, "sdxl-fused": fused, **{k: v for k, v in models.items() if k != "sdxl"}}


def make_inputs(cfg: dict, batch: int, res: int, device, dtype, seed: int) -> dict:
    """Random UNet inputs for `batch` images of res x res pixels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    latent = res // 8
    inputs = {
        "sample": torch.randn(batch, cfg["in_channels"], latent, latent, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(
            batch, TOKENS, cfg["cross_attention_dim"], generator=g
        ),
        "text_embeds": torch.randn(batch, pooled_dim(cfg), generator=g),
        "time_ids": square_time_ids(batch, res),
    }
    return {k: v.to(device, torch.float32 if k == "timestep" else dtype) for k, v in inputs.items()}


def call(impl: str, model: nn.Module, x: dict) -> torch.Tensor:
    """One UNet evaluation with each implementation's calling convention."""
    return diffusers_forward(model, **x) if impl == "diffusers" else model(**x)


def make_step(impl: str, model: nn.Module, x: dict, mode: str) -> Callable[[], None]:
    """A closure doing one forward (no grad) or one forward+backward on the output sum."""
    if mode == "forward":

        def step():
            with torch.no_grad():
                call(impl, model, x)

    else:

        def step():
            for p in model.parameters():
                p.grad = None
            call(impl, model, x).float().sum().backward()

    return step


def prepare(models: dict, mode: str, grad_ckpt: str, compile_: bool) -> dict:
    """Set train/eval and checkpointing for `mode`; wrap in torch.compile when asked."""
    out = {}
    for impl, model in models.items():
        model.train(mode == "train")
        model.requires_grad_(mode == "train")
        set_checkpointing(impl, model, grad_ckpt)
        out[impl] = torch.compile(model) if compile_ else model
    return out


def max_rel_err(models: dict, x: dict, impl: str, ref: str) -> float:
    """Max |impl - ref| / max |ref| on one forward (a sanity check of the weights copy / fusion)."""
    with torch.no_grad():
        a = call(impl, models[impl].eval(), x).float()
        b = call(ref, models[ref].eval(), x).float()
    return ((a - b).abs().max() / b.abs().max()).item()


def run(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args.config)
    device, dtype = device_and_dtype(args)
    res = args.resolution or 8 * cfg.get("sample_size", 128)
    torch.manual_seed(args.seed)
    models = add_fused(
        build_models(cfg, device, dtype, args.compare == "diffusers"), cfg, args.fused_qkv
    )
    print(header(args, device, dtype, res, models["sdxl"]))
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    rows = []
    for batch in args.batch:
        x = make_inputs(cfg, batch, res, device, dtype, args.seed)
        ref = "diffusers" if "diffusers" in models else "sdxl"
        for impl in (i for i in models if i not in (ref, "diffusers")):
            print(
                f"batch {batch}: {impl} max rel err vs {ref} {max_rel_err(models, x, impl, ref):.2e}"
            )
        for mode in modes:
            rows += bench_mode(
                models, x, mode, args, device, dict(batch=batch, res=res, dtype=dtype)
            )
    return add_ratios(rows, "ms", ("batch", "mode"))


def bench_mode(models: dict, x: dict, mode: str, args, device, row: dict) -> list[dict]:
    """Time every implementation on one (batch, mode)."""
    rows = []
    for impl, model in prepare(models, mode, args.grad_checkpointing, args.compile).items():
        with PeakMemory(device, model) as mem:
            ms = time_ms(make_step(impl, model, x, mode), args.warmup, args.iters, device)
        rows.append({**row, "impl": impl, "mode": mode, "ms": ms, "mem": mem.text})
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def header(args, device: torch.device, dtype: torch.dtype, res: int, model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{device_line(device)}\n"
        f"config: {args.config} ({params:,} params), res {res}px (latent {res // 8}), {dtype}, "
        f"grad checkpointing {args.grad_checkpointing}, fused qkv {args.fused_qkv}, "
        f"compile {args.compile}, "
        f"warmup {args.warmup}, iters {args.iters}"
    )


def table(rows: list[dict]) -> str:
    """Markdown table; ratio is our ms/iter divided by diffusers' (below 1 = we are faster)."""
    columns = ("impl", "batch", "res", "dtype", "mode", "ms/iter", "peak mem", "ratio vs diffusers")
    cells = [(r["impl"], r["batch"], r["res"], dtype_label(r["dtype"]), r["mode"],
              f"{r['ms']:.1f}", r["mem"], r["ratio"]) for r in rows]  # fmt: skip
    return markdown_table(columns, "lrrllrrr", cells)


def main(argv: list[str] | None = None) -> None:
    rows = run(parse_args(argv))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
