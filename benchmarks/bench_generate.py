r"""Text-to-image speed and peak memory of sdxl's pipeline, optionally next to diffusers' on the same weights.

One call = text encoding + CFG denoising loop + VAE decode + PIL conversion, timed end to end
after warm-up: the path generate_images.py runs. latency = seconds per call; s/image = latency /
batch. compile = first call minus a timed call (torch.compile, and on CUDA the CUDA-graph capture).
`--compare diffusers` loads StableDiffusionXLPipeline (EulerDiscreteScheduler for euler) from the
same folder in the same run. `--compile both` times each pipeline eager and compiled: ours through
its fast path (guided UNet + VAE decode compiled, each denoise step one CUDA graph on CUDA),
diffusers with its UNet under torch.compile. `--write-check` also times our calls with every image
PNG-encoded and written by the background writer generate_images.py uses: "PNG wait" is how much
longer those calls take, i.e. how long generation waited for PNG encoding.

--model: a diffusers SDXL folder; `builtin:tiny` (default, the tiny test model); or `sdxl-random`:
full-size SDXL base architecture with random weights, written once (in --dtype) to --model-dir.
Its text encoders use the tiny 1000-token vocabulary (the only tokenizer we can write offline);
vocabulary size changes only the embedding lookup, not the UNet/VAE/encoder cost.

    python benchmarks/bench_generate.py --model sdxl-random --resolution 1024 --batch 1 4 \
        --compile both --compare diffusers
    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --model builtin:tiny --resolution 128 \
        --steps 4 --batch 1 2 --device cpu --compare diffusers --compile both --iters 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from harness import (  # noqa: E402
    PeakMemory,
    add_device_args,
    add_ratios,
    add_timing_args,
    device_and_dtype,
    device_line,
    dtype_label,
    markdown_table,
    measure_or_explain,
    sync,
    time_first_call,
)

from sdxl import load_pipeline  # noqa: E402
from sdxl.generate.run import WRITE_THREADS  # noqa: E402
from sdxl.generate.writers import BackgroundWriter, write_item  # noqa: E402
from sdxl.models.configs import BUILTIN_TINY, SDXL_BASE, TINY_VOCAB_SIZE  # noqa: E402
from sdxl.pipeline import FastPath, SampleSettings  # noqa: E402
from sdxl.tiny import ensure_tiny_sdxl, write_random_sdxl  # noqa: E402

RANDOM_SDXL = "sdxl-random"
DIFFUSERS_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
COMPILE = {"off": [False], "on": [True], "both": [False, True]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=BUILTIN_TINY, help=f"folder | {BUILTIN_TINY} | {RANDOM_SDXL}")
    p.add_argument("--model-dir", help=f"where {RANDOM_SDXL} is written (default: a temp folder)")
    p.add_argument("--resolution", type=int, help="pixels; default the model's (1024 for SDXL)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sampler", choices=list(DIFFUSERS_SCHEDULERS), default="euler")
    add_device_args(p)
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        choices=list(COMPILE),
        default="off",
        help="off | on | both (--compile alone means on): ours compiles the guided UNet and VAE "
        "decode (+ CUDA graphs on CUDA); diffusers compiles its UNet",
    )
    p.add_argument("--channels-last", action="store_true", help="our UNet/VAE in NHWC")
    p.add_argument(
        "--write-check", action="store_true", help="also time ours with background PNG writes"
    )
    add_timing_args(p, warmup=1, iters=3)
    p.add_argument("--prompt", default="a photo of a red circle on a white background")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- weights


def resolve_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Path:
    """The diffusers folder both pipelines load, writing the tiny or random SDXL if needed."""
    if args.model == BUILTIN_TINY:
        return ensure_tiny_sdxl()
    if args.model == RANDOM_SDXL:
        name = f"sdxl-random-{dtype_label(dtype)}-seed{args.seed}"
        folder = Path(args.model_dir or Path(tempfile.gettempdir()) / name)
        if not (folder / "model_index.json").exists():
            print(f"writing full-size random SDXL ({dtype}) to {folder} ...", flush=True)
            # Text encoders get the tiny tokenizer's vocabulary; their cost barely changes.
            configs = {
                name: {**cfg, "vocab_size": TINY_VOCAB_SIZE} if name.startswith("text") else cfg
                for name, cfg in SDXL_BASE.items()
            }
            write_random_sdxl(folder, configs, args.seed, dtype, device)
        return folder
    folder = Path(args.model)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(
            f"--model {args.model!r}: not a diffusers SDXL folder (no model_index.json)"
        )
    return folder


# ----------------------------------------------------------------------------- pipelines


class Impl:
    """One pipeline under test: how to run a batch, its networks, and how to switch compile."""

    def __init__(self, name: str, pipe, run: Callable[[list[str], int], list]):
        self.name, self.pipe, self.run = name, pipe, run
        self.unet = pipe.unet  # eager
        encoders = (
            pipe.text_encoders if name == "sdxl" else (pipe.text_encoder, pipe.text_encoder_2)
        )
        self.networks = nn.ModuleList([self.unet, pipe.vae, *encoders])

    def use_compiled(self, compiled: bool, channels_last: bool = False) -> None:
        if self.name == "sdxl":  # the generation fast path, exactly as generate_images.py sets it
            self.pipe.use_fast_path(FastPath.default(self.pipe.device, compiled, channels_last))
        else:
            self.pipe.unet = torch.compile(self.unet, dynamic=False) if compiled else self.unet


def load_ours(folder: Path, device: torch.device, dtype: torch.dtype, args) -> Impl:
    pipe = load_pipeline(folder, device=device, dtype=dtype)

    def run(prompts: list[str], size: int) -> list:
        settings = SampleSettings(width=size, height=size, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, sampler=args.sampler,
                                  seed=args.seed)  # fmt: skip
        return pipe.generate(prompts, settings)

    return Impl("sdxl", pipe, run)


def load_diffusers(folder: Path, device: torch.device, dtype: torch.dtype, args) -> Impl:
    import diffusers
    import transformers
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=dtype, add_watermarker=False
    )
    scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[args.sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)

    def run(prompts: list[str], size: int) -> list:
        generators = [
            torch.Generator("cpu").manual_seed(args.seed + i) for i in range(len(prompts))
        ]
        return pipe(
            prompts,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generators,
            output_type="pil",
        ).images

    return Impl("diffusers", pipe, run)


# ----------------------------------------------------------------------------- timing


def time_calls(call: Callable[[], list], warmup: int, iters: int, device: torch.device) -> dict:
    """Seconds of the first call (includes compilation) and mean seconds of the timed calls."""
    first, images = time_first_call(call, device)
    for _ in range(warmup - 1):
        call()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        images = call()
    sync(device)
    return {"first_s": first, "s": (time.perf_counter() - t0) / iters, "images": images}


def time_with_writes(impl: Impl, prompts: list[str], size: int, iters: int, device) -> float:
    """Seconds per call when every image is PNG-encoded and written in the background, as
    generate_images.py does (the last writes included): compare with the plain timed call."""
    with tempfile.TemporaryDirectory() as folder:
        sync(device)
        t0 = time.perf_counter()
        with BackgroundWriter(WRITE_THREADS, max_pending=2 * len(prompts)) as writer:
            for it in range(iters):
                for k, image in enumerate(impl.run(prompts, size)):
                    meta = {"prompt": prompts[k], "index": it * len(prompts) + k}
                    writer.submit(write_item, Path(folder), f"{it:03d}-{k:03d}", image, meta, False)
        return (time.perf_counter() - t0) / iters


def bench_one(impl: Impl, prompts: list[str], size: int, compiled: bool, device, args) -> dict:
    """Time one pipeline on one (compile, batch); OOM and compile failures become the row's text."""

    def measure() -> dict:
        with PeakMemory(device, impl.networks) as mem:
            out = time_calls(lambda: impl.run(prompts, size), args.warmup, args.iters, device)
        if args.write_check and impl.name == "sdxl":
            out["write_s"] = time_with_writes(impl, prompts, size, args.iters, device)
        return {**out, "mem": mem.text}

    return measure_or_explain(measure, {"s": None}, impl.name, compiled, device)


def max_pixel_diff(a: list, b: list) -> int:
    """Largest per-pixel difference (0-255) between two lists of PIL images."""
    return max(
        int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max())
        for x, y in zip(a, b, strict=True)
    )


def run(args: argparse.Namespace) -> list[dict]:
    """Rows (keys: impl, compile, batch, res, steps, s (latency), first_s, write_s (with
    --write-check), mem, ratio, images)."""
    device, dtype = device_and_dtype(args)
    folder = resolve_model(args, device, dtype)
    impls = [load_ours(folder, device, dtype, args)]
    if args.compare == "diffusers":
        impls.append(load_diffusers(folder, device, dtype, args))
    size = args.resolution or impls[0].pipe.default_size
    print(header(args, device, dtype, folder, size, impls[0]))
    rows = []
    for compiled in COMPILE[args.compile]:
        for impl in impls:
            impl.use_compiled(compiled, args.channels_last)
        for batch in args.batch:
            row = {"compile": compiled, "batch": batch, "res": size, "steps": args.steps}
            outs = {}
            for impl in impls:
                outs[impl.name] = bench_one(
                    impl, [args.prompt] * batch, size, compiled, device, args
                )
                rows.append({**row, "impl": impl.name, **outs[impl.name]})
            print(progress_line(row, outs))
    return add_ratios(rows, "s", ("batch",), is_diffusers_eager)


def is_diffusers_eager(row: dict) -> bool:
    """The ratios' reference: s/image over diffusers' eager s/image at the same batch."""
    return row["impl"] == "diffusers" and not row["compile"]


def progress_line(row: dict, outs: dict) -> str:
    """First-call seconds (compile included) and, with both impls, how far their images differ."""
    parts = [f"{k} first call {o['first_s']:.2f} s" for k, o in outs.items() if o["s"]]
    if len(outs) == 2 and all(o["s"] for o in outs.values()):
        diff = max_pixel_diff(outs["sdxl"]["images"], outs["diffusers"]["images"])
        parts.append(f"max pixel diff ours vs diffusers {diff}/255")
    return f"compile {row['compile']}, batch {row['batch']}: " + ", ".join(parts)


def _count(*modules: nn.Module) -> str:
    return f"{sum(p.numel() for m in modules for p in m.parameters()):,}"


def header(args, device, dtype, folder: Path, size: int, ours: Impl) -> str:
    unet, vae, *encoders = ours.networks
    params = f"unet {_count(unet)}, vae {_count(vae)}, text encoders {_count(*encoders)}"
    return (
        f"{device_line(device)}\n"
        f"model: {args.model} ({folder})\nparams: {params}; {dtype}, {size}px, {args.steps} "
        f"steps, {args.sampler}, guidance {args.guidance}, warmup {args.warmup}, iters {args.iters}"
    )


def table(rows: list[dict]) -> str:
    """Markdown table; ratio is s/image over diffusers' eager s/image at the same batch."""
    columns = ("impl", "compile", "batch", "res", "steps", "latency s", "s/image", "images/s",
               "compile s", "PNG wait", "peak mem", "ratio vs diffusers eager")  # fmt: skip
    cells = []
    for r in rows:
        s = r["s"]
        per = s / r["batch"] if s else None
        lat, sec, ips = (f"{s:.3f}", f"{per:.3f}", f"{1 / per:.2f}") if per else ("-",) * 3
        comp = f"{max(r['first_s'] - s, 0):.1f}" if s and r["compile"] else "-"
        wait = f"{100 * (r['write_s'] - s) / s:+.0f}%" if s and "write_s" in r else "-"
        cells.append((r["impl"], "on" if r["compile"] else "off", r["batch"], r["res"],
                      r["steps"], lat, sec, ips, comp, wait, r["mem"], r["ratio"]))  # fmt: skip
    return markdown_table(columns, "llrrrrrrrrrr", cells)


def main(argv: list[str] | None = None) -> None:
    rows = run(parse_args(argv))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
