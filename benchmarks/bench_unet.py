"""Speed and peak memory of sdxl's UNet, optionally next to diffusers' on the same weights and inputs.

Weights are random (diffusers' init, copied into ours); inputs are random latents, a 77-token
context, pooled text and SDXL size ids. Prints a markdown table for BENCHMARKS.md.

    python benchmarks/bench_unet.py --config sdxl --resolution 1024 --batch 1 4 --dtype bf16 \
        --mode both --compare diffusers --fused-qkv both
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py --config tiny --resolution 256 --batch 1 2 \
        --dtype fp32 --device cpu --compare diffusers --iters 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from sdxl.models.configs import SDXL_BASE, TINY  # noqa: E402
from sdxl.models.unet import CHECKPOINTING, UNet2DConditionModel, UNetConfig  # noqa: E402
from sdxl.utils import to_dtype  # noqa: E402

TOKENS = 77  # CLIP context length


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="sdxl", help="sdxl | tiny | path to a unet config.json")
    p.add_argument("--resolution", type=int, help="pixels (latent = /8); default sample_size*8")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 (GPU), fp32 (CPU)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
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
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compare", choices=["none", "diffusers"], default="none")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_config(name: str) -> dict:
    """A diffusers unet config dict from a preset name or a config.json path."""
    presets = {"sdxl": SDXL_BASE["unet"], "tiny": TINY["unet"]}
    if name in presets:
        return dict(presets[name])
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--config {name!r}: not 'sdxl', 'tiny' or an existing config.json")
    return json.loads(path.read_text())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    return torch.device(name)


def build_models(cfg: dict, device: torch.device, dtype: torch.dtype, compare: bool) -> dict:
    """{impl: model}; with --compare both hold the same (diffusers-initialised) weights."""
    with torch.device(device):
        ours = UNet2DConditionModel(UNetConfig.from_dict(cfg))
    models = {"sdxl": ours.to(dtype)}
    if compare:
        from diffusers import UNet2DConditionModel as DiffusersUNet
        from diffusers.utils import logging

        logging.set_verbosity_error()  # its .to(dtype) advice concerns from_pretrained, not us
        with torch.device(device):
            ref = DiffusersUNet.from_config(cfg)
        ref.to(dtype)
        ours.load_state_dict(ref.state_dict(), strict=True)
        models["diffusers"] = ref
    return models


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
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(batch, 1)
    inputs = {
        "sample": torch.randn(batch, cfg["in_channels"], latent, latent, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(
            batch, TOKENS, cfg["cross_attention_dim"], generator=g
        ),
        "text_embeds": torch.randn(batch, pooled, generator=g),
        "time_ids": ids,
    }
    return {k: v.to(device, torch.float32 if k == "timestep" else dtype) for k, v in inputs.items()}


def call(impl: str, model: nn.Module, x: dict) -> torch.Tensor:
    """One UNet evaluation with each implementation's calling convention."""
    if impl == "diffusers":
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        return model(
            x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
    return model(**x)


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


def time_ms(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Mean milliseconds per step: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1000 / iters


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one timed run, as if only this model's weights were resident.

    GPU: weights + (max_memory_allocated during the run - allocated before it).
    CPU: growth of the process' peak RSS over its RSS before the run (Linux), else n/a.
    """

    def __init__(self, device: torch.device, model: nn.Module):
        self.device = device
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = self._reset_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            extra = torch.cuda.max_memory_allocated(self.device) - self.before
            self.text = f"{(self.weights + extra) / 2**20:,.0f} MiB"
        else:
            hwm = _proc_status_kib("VmHWM")
            ok = self.before is not None and hwm is not None
            self.text = f"RSS +{(hwm - self.before) / 1024:,.0f} MiB" if ok else "n/a"

    @staticmethod
    def _reset_rss() -> int | None:
        """Return freed heap to the OS, reset the peak-RSS mark (clear_refs 5); RSS in KiB."""
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except (OSError, AttributeError):
            return None
        return _proc_status_kib("VmRSS")


def prepare(models: dict, mode: str, grad_ckpt: str, compile_: bool) -> dict:
    """Set train/eval and checkpointing for `mode`; wrap in torch.compile when asked."""
    out = {}
    for impl, model in models.items():
        model.train(mode == "train")
        model.requires_grad_(mode == "train")
        if impl != "diffusers":
            model.set_gradient_checkpointing(grad_ckpt)
        elif grad_ckpt != "none":
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
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
    device = pick_device(args.device)
    dtype = to_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
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
    return rows


def bench_mode(models: dict, x: dict, mode: str, args, device, row: dict) -> list[dict]:
    """Time every implementation on one (batch, mode); ratio = our time / diffusers' time."""
    rows = []
    for impl, model in prepare(models, mode, args.grad_checkpointing, args.compile).items():
        with PeakMemory(device, model) as mem:
            ms = time_ms(make_step(impl, model, x, mode), args.warmup, args.iters, device)
        rows.append({**row, "impl": impl, "mode": mode, "ms": ms, "mem": mem.text})
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = next((r["ms"] for r in rows if r["impl"] == "diffusers"), None)
    for r in rows:
        r["ratio"] = f"{r['ms'] / ref:.2f}" if ref else "-"
    return rows


def header(args, device: torch.device, dtype: torch.dtype, res: int, model: nn.Module) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    params = sum(p.numel() for p in model.parameters())
    return (
        f"device: {device.type} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}\n"
        f"config: {args.config} ({params:,} params), res {res}px (latent {res // 8}), {dtype}, "
        f"grad checkpointing {args.grad_checkpointing}, fused qkv {args.fused_qkv}, "
        f"compile {args.compile}, "
        f"warmup {args.warmup}, iters {args.iters}"
    )


def table(rows: list[dict]) -> str:
    """Markdown table; ratio is our ms/iter divided by diffusers' (below 1 = we are faster)."""
    lines = [
        "| impl | batch | res | dtype | mode | ms/iter | peak mem | ratio vs diffusers |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        dtype = str(r["dtype"]).removeprefix("torch.")
        lines.append(
            f"| {r['impl']} | {r['batch']} | {r['res']} | {dtype} | {r['mode']} | "
            f"{r['ms']:.1f} | {r['mem']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    rows = run(parse_args(argv))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
