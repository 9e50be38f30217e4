r"""Speed and peak memory of one LoRA training step: sdxl's, and diffusers+peft's on the same inputs.

A step is exactly what the training loop runs per optimizer update, `sdxl.train.step.train_step`
on staged cached-style inputs (latent mean/std and their flipped variants, prompt embeds,
pooled, time ids, device-drawn noise): forward, backward into preallocated gradients,
all-reduce, clipping, the on-device finiteness flag, fused AdamW, for both implementations
(diffusers' UNet behind our calling convention). With --compile the first step's time (compile
included) is reported apart from the steady-state ms/step. Both UNets hold the same random weights (diffusers' init, copied into
ours) and the same initial LoRA; the base is cast to --dtype and the LoRA factors stay fp32
(ours: injected after the cast; diffusers: `cast_training_params`, as its LoRA SDXL script does).
Prints the LoRA parameter counts (equal) and a markdown table for BENCHMARKS.md.

    python benchmarks/bench_train.py --config sdxl --resolution 512 1024 --batch 1 4 \
        --grad-checkpointing both --compare diffusers
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --config tiny --resolution 128 \
        --batch 1 2 --grad-checkpointing both --device cpu --compare diffusers --iters 3
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
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
    measure_or_explain,
    pooled_dim,
    set_checkpointing,
    square_time_ids,
    time_first_call,
    time_ms,
)

from sdxl.lora import LoRAConfig, inject_lora, lora_modules, lora_parameters  # noqa: E402
from sdxl.models.configs import SCHEDULER  # noqa: E402
from sdxl.noise_schedule import NoiseSchedule  # noqa: E402
from sdxl.train.config import TrainConfig, for_model  # noqa: E402
from sdxl.train.data_order import step_generator  # noqa: E402
from sdxl.train.distributed import DistInfo  # noqa: E402
from sdxl.train.loss import draw_step_noise, per_sample_loss  # noqa: E402
from sdxl.train.optim import make_optimizer  # noqa: E402
from sdxl.train.step import TrainStep, train_step  # noqa: E402

PEFT_TARGETS = {
    "attention": ["to_q", "to_k", "to_v"],
    "attention_out": ["to_q", "to_k", "to_v", "to_out.0"],
}
CKPT = {"on": [True], "off": [False], "both": [False, True]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    p.add_argument("--resolution", type=int, nargs="+", help="pixels; default sample_size*8")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, help="LoRA alpha; default = rank (diffusers' script)")
    p.add_argument("--target", choices=list(PEFT_TARGETS), default="attention")
    p.add_argument("--grad-checkpointing", choices=list(CKPT), default="on")
    add_device_args(p)
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        choices=["off", "on"],
        default="off",
        help="compile the training step (train.compile; --compile alone means on)",
    )
    p.add_argument("--cuda-graphs", choices=["off", "on"], default="off",
                   help="replay the step as one CUDA graph (train.cuda_graphs)")  # fmt: skip
    add_timing_args(p, warmup=2, iters=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class DiffusersCall(nn.Module):
    """diffusers' UNet behind our positional calling convention, so one loss function serves both."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, text_embeds, time_ids) -> torch.Tensor:
        return diffusers_forward(self.unet, sample, timestep, context, text_embeds, time_ids)


def add_lora(models: dict, args: argparse.Namespace) -> dict[str, list[nn.Parameter]]:
    """LoRA on both UNets (already cast to the base dtype); returns each one's fp32 LoRA params."""
    alpha = args.alpha if args.alpha is not None else float(args.rank)
    inject_lora(models["sdxl"], LoRAConfig(rank=args.rank, alpha=alpha, target=args.target))
    params = {"sdxl": lora_parameters(models["sdxl"])}
    if "diffusers" in models:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        ref = models["diffusers"]
        ref.requires_grad_(False)
        ref.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                target_modules=PEFT_TARGETS[args.target],
            )
        )
        cast_training_params(ref, dtype=torch.float32)
        params["diffusers"] = [p for p in ref.parameters() if p.requires_grad]
        copy_peft_init(models["sdxl"], ref)
    return params


def copy_peft_init(ours: nn.Module, ref: nn.Module) -> None:
    """Start our LoRA from peft's (lora_A -> lora_down, lora_B -> lora_up): same loss, same grads."""
    sd = ref.state_dict()
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            m.lora_down.weight.copy_(sd[f"{name}.lora_A.default.weight"])
            m.lora_up.weight.copy_(sd[f"{name}.lora_B.default.weight"])


def make_rows(cfg: dict, batch: int, res: int, seed: int) -> dict[str, torch.Tensor]:
    """Random stand-ins for one rank's host rows, as `sdxl.train.batches.read_rows` returns them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    latent = (batch, cfg["in_channels"], res // 8, res // 8)
    ids = square_time_ids(batch, res)
    rows = {
        "mean": torch.randn(latent, generator=g),
        "std": torch.rand(latent, generator=g) * 0.1,
        "prompt_embeds": torch.randn(batch, TOKENS, cfg["cross_attention_dim"], generator=g),
        "pooled": torch.randn(batch, pooled_dim(cfg), generator=g),
        "time_ids": ids,
        "weight": torch.full((batch,), 1.0 / batch),
    }
    rows.update(mean_flip=rows["mean"].flip(-1), std_flip=rows["std"].flip(-1), time_ids_flip=ids)
    return rows


def make_step(model: nn.Module, params: list, rows: dict, ctx: dict) -> tuple[TrainStep, dict]:
    """The trainer's TrainStep for `model` and its one staged micro-batch (static, like a bucket)."""
    cfg, device = replace(ctx["train_cfg"], batch_size=rows["mean"].shape[0]), ctx["device"]
    empty = (torch.zeros_like(rows["prompt_embeds"][0]), torch.zeros_like(rows["pooled"][0]))
    step = TrainStep(model, params, make_optimizer(params, cfg), ctx["schedule"], cfg,
                     DistInfo(0, 1, device), per_sample_loss, tuple(e.to(device) for e in empty))  # fmt: skip
    rnd = draw_step_noise(step_generator(0, 0, 0, device), rows["mean"].shape[0],
                          tuple(rows["mean"].shape[1:]), cfg)  # fmt: skip
    return step, step.stage(rows, rnd)


def time_train_step(step: TrainStep, micro: dict, warmup: int, iters: int,
                    device: torch.device) -> dict:  # fmt: skip
    """first_step_s (compile and capture included), then mean ms per `train_step` after warmup."""
    first, _ = time_first_call(lambda: train_step(step, [micro]), device)
    ms = time_ms(lambda: train_step(step, [micro]), max(warmup - 1, 0), iters, device)
    return {"first_step_s": first, "ms": ms}


def callables(models: dict) -> dict[str, nn.Module]:
    """What the loss calls for each impl: our UNet, or diffusers' behind the adapter."""
    for model in models.values():
        model.train()
    return {impl: DiffusersCall(m) if impl == "diffusers" else m for impl, m in models.items()}


def check_parity(steps: dict) -> str:
    """Relative difference of the first step's loss and LoRA gradient norm, ours vs diffusers."""
    out = {impl: train_step(step, [micro]) for impl, (step, micro) in steps.items()}
    loss = {impl: r.losses.sum().item() for impl, r in out.items()}
    gnorm = {impl: r.grad_norm.item() for impl, r in out.items()}
    rel = abs(loss["sdxl"] - loss["diffusers"]) / abs(loss["diffusers"])
    grel = abs(gnorm["sdxl"] - gnorm["diffusers"]) / max(gnorm["diffusers"], 1e-30)
    return f"first loss rel diff {rel:.2e}, LoRA grad-norm rel diff {grel:.2e}"


def bench_one(impl: str, step: TrainStep, micro: dict, model: nn.Module, args) -> dict:
    """Time one impl on one (res, batch, ckpt); failures (OOM, compile) become the row's text."""
    device = step.device

    def measure() -> dict:
        with PeakMemory(device, model) as mem:
            out = time_train_step(step, micro, args.warmup, args.iters, device)
        reserved = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
        return {**out, "mem": mem.text, "reserved": f"{reserved:,.0f} MiB" if reserved else "-"}

    failed = {"ms": None, "first_step_s": None, "reserved": "-"}
    return measure_or_explain(measure, failed, impl, args.compile != "off", device)


def run(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args.config)
    device, dtype = device_and_dtype(args)
    torch.manual_seed(args.seed)
    models = build_models(cfg, device, dtype, args.compare == "diffusers")
    params = add_lora(models, args)
    counts = {impl: sum(p.numel() for p in ps) for impl, ps in params.items()}
    print(header(args, device, dtype, models["sdxl"], counts))
    if len(set(counts.values())) != 1:
        raise SystemExit(f"LoRA parameter counts differ: {counts}")
    precision = dtype_label(dtype).replace("bfloat16", "bf16")
    precision = {"float32": "fp32", "float16": "fp16"}.get(precision, precision)
    train_cfg = TrainConfig(data_dir="-", lora_rank=args.rank, precision=precision,
                            compile=args.compile == "on", cuda_graphs=args.cuda_graphs == "on")  # fmt: skip
    ctx = {
        "device": device,
        "schedule": NoiseSchedule.from_config(SCHEDULER).to(device),
        "train_cfg": for_model(train_cfg, SCHEDULER, "the SDXL base scheduler"),
    }
    calls = callables(models)
    rows = []
    for res in args.resolution or [8 * cfg.get("sample_size", 128)]:
        for batch in args.batch:
            host = make_rows(cfg, batch, res, args.seed)
            if "diffusers" in models and args.compile == "off":
                steps = {impl: make_step(calls[impl], params[impl], host, ctx) for impl in models}
                print(f"res {res}, batch {batch}: {check_parity(steps)}")
            for ckpt in CKPT[args.grad_checkpointing]:
                row = {"res": res, "batch": batch, "ckpt": ckpt, "dtype": dtype}
                for impl, model in models.items():
                    set_checkpointing(impl, model, ckpt)
                    step, micro = make_step(calls[impl], params[impl], host, ctx)
                    rows.append({**row, "impl": impl, **bench_one(impl, step, micro, model, args)})
    return add_ratios(rows, "ms", ("res", "batch", "ckpt"))  # our ms/step over diffusers'


def header(args, device: torch.device, dtype: torch.dtype, model: nn.Module, counts: dict) -> str:
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = ", ".join(f"{impl} {n:,}" for impl, n in counts.items())
    return (
        f"{device_line(device)}\n"
        f"config: {args.config} ({base:,} base params, {dtype}), LoRA rank {args.rank} "
        f"target {args.target} (fp32 params: {lora}), compile {args.compile}, "
        f"cuda graphs {args.cuda_graphs}, "
        f"warmup {args.warmup}, iters {args.iters}"
    )


def table(rows: list[dict]) -> str:
    """Markdown table; ratio is our ms/step divided by diffusers' (below 1 = we are faster)."""
    columns = ("impl", "res", "batch", "ckpt", "dtype", "ms/step", "images/s", "peak alloc",
               "peak reserved", "first step s", "ratio vs diffusers")  # fmt: skip
    cells = []
    for r in rows:
        ms = f"{r['ms']:.1f}" if r["ms"] else "-"
        ips = f"{r['batch'] * 1000 / r['ms']:.2f}" if r["ms"] else "-"
        first = f"{r['first_step_s']:.2f}" if r["first_step_s"] else "-"
        cells.append((r["impl"], r["res"], r["batch"], "on" if r["ckpt"] else "off",
                      dtype_label(r["dtype"]), ms, ips, r["mem"], r["reserved"], first,
                      r["ratio"]))  # fmt: skip
    return markdown_table(columns, "lrrllrrrrrr", cells)


def main(argv: list[str] | None = None) -> None:
    rows = run(parse_args(argv))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
