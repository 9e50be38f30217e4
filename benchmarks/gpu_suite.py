"""Every GPU check of the project in one command: correctness on CUDA first, then the timings.

A GPU is available rarely and briefly, so this one script does it all in a fixed order and a
time budget, next to diffusers in the same process:

1. parity: our UNet vs diffusers' on the same random full-size SDXL weights in bf16 (max
   relative error), our images vs diffusers' (max pixel difference);
2. timings (median of the iterations; peak allocated memory): the UNet CFG step at 1024²,
   the LoRA training step (rank 4, attention_out) at 1024² batch 1 with checkpointing and
   batch 4 without (with model-FLOP utilisation), and generation at 1024², 30 Euler steps,
   batch 1 and 4 — each eager and compiled, ours and diffusers'.

Each stage is one of the benchmark scripts beside this file (their `parse_args`/`run`/`table`),
so what is timed here is what they time. Stages that would not fit in the rest of the budget
are skipped and say so. Results: `<out>/gpu_suite.json` (every row) and `<out>/gpu_suite.md`
(the tables and the stages' own output, ready for BENCHMARKS.md).

    python benchmarks/gpu_suite.py --out $OUT              # on an H100/H200, ~9 minutes
    OMP_NUM_THREADS=1 python benchmarks/gpu_suite.py --smoke --out /tmp/suite   # CPU, tiny
    (tests/test_benchmarks.py runs `--smoke --eager-only`, so the suite never rots unseen)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TRAIN_TFLOP_PER_SAMPLE = 13.5  # fwd + bwd through the frozen SDXL UNet at 1024² (performance.md)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


@dataclass(frozen=True)
class Stage:
    """One benchmark run: a script beside this file and its arguments (full size and smoke)."""

    name: str
    script: str  # module name in benchmarks/
    argv: tuple[str, ...]
    smoke_argv: tuple[str, ...]
    cost_s: float  # rough cost on an H200 (compile included), for the budget

    @property
    def compiled(self) -> bool:
        return "--compile" in self.argv


STAGES = (
    Stage("unet CFG step, eager, parity", "bench_unet",
          ("--config", "sdxl", "--resolution", "1024", "--batch", "2", "--mode", "forward",
           "--compare", "diffusers", "--fused-qkv", "both", "--iters", "20"),
          ("--config", "tiny", "--resolution", "64", "--batch", "2", "--mode", "forward",
           "--compare", "diffusers", "--fused-qkv", "both", "--iters", "2", "--device", "cpu"),
          75),
    Stage("train b1 ckpt, eager", "bench_train",
          ("--config", "sdxl", "--resolution", "1024", "--batch", "1", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "on", "--compare", "diffusers"),
          ("--config", "tiny", "--resolution", "64", "--batch", "1", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "on", "--compare", "diffusers",
           "--iters", "2", "--device", "cpu"), 60),
    Stage("train b4 no ckpt, eager (MFU)", "bench_train",
          ("--config", "sdxl", "--resolution", "1024", "--batch", "4", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "off"),
          ("--config", "tiny", "--resolution", "64", "--batch", "4", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "off", "--iters", "2",
           "--device", "cpu"), 45),
    Stage("generate 1024² 30 steps, eager, parity", "bench_generate",
          ("--model", "sdxl-random", "--batch", "1", "4", "--steps", "30", "--compare",
           "diffusers"),
          ("--batch", "1", "2", "--steps", "2", "--resolution", "64", "--compare", "diffusers",
           "--iters", "1", "--device", "cpu"), 90),
    Stage("train b1 ckpt, compiled", "bench_train",
          ("--config", "sdxl", "--resolution", "1024", "--batch", "1", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "on", "--compile", "on",
           "--compare", "diffusers"),
          ("--config", "tiny", "--resolution", "64", "--batch", "1", "--rank", "4",
           "--target", "attention_out", "--grad-checkpointing", "on", "--compile", "on",
           "--iters", "2", "--device", "cpu"), 150),
    Stage("generate 1024² 30 steps, compiled", "bench_generate",
          ("--model", "sdxl-random", "--batch", "1", "4", "--steps", "30", "--compile", "on",
           "--compare", "diffusers"),
          ("--batch", "1", "--steps", "2", "--resolution", "64", "--compile", "on", "--iters",
           "1", "--device", "cpu"), 150),
)  # fmt: skip


def environment() -> dict:
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cuda": torch.cuda.is_available()}  # fmt: skip
    with contextlib.suppress(ImportError):
        import diffusers

        env["diffusers"] = diffusers.__version__
    if torch.cuda.is_available():
        env.update(
            device=torch.cuda.get_device_name(0),
            cuda_version=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdpa_backends={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            },
        )
    return env


def add_mfu(rows: list[dict], device_name: str | None) -> None:
    """Model-FLOP utilisation of 1024² training rows (recompute not counted as useful work)."""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device_name and k in device_name), None)
    for r in rows:
        if peak and r.get("ms") and r.get("res") == 1024:
            tflops = TRAIN_TFLOP_PER_SAMPLE * r["batch"] / (r["ms"] / 1000)
            r["mfu"] = f"{100 * tflops / peak:.1f}%"


def run_stage(stage: Stage, smoke: bool) -> dict:
    """Run one stage, capturing its printed lines (parity figures are printed there)."""
    module = importlib.import_module(stage.script)
    argv = list(stage.smoke_argv if smoke else stage.argv)
    printed = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            rows = module.run(module.parse_args(argv))
        table, error = module.table(rows), None
    except Exception as err:  # one failing stage must not cost the rest of the GPU time
        rows, table, error = [], "", f"{type(err).__name__}: {str(err).strip()[:300]}"
    seconds = time.perf_counter() - start
    return {"name": stage.name, "command": f"python benchmarks/{stage.script}.py {' '.join(argv)}",
            "seconds": round(seconds, 1), "output": printed.getvalue(), "rows": rows,
            "table": table, "error": error}  # fmt: skip


def markdown(env: dict, results: list[dict]) -> str:
    """The report: environment, then each stage's command, output and table."""
    lines = ["# GPU suite", "", "```", json.dumps(env, indent=1), "```", ""]
    for r in results:
        lines += [f"## {r['name']} ({r['seconds']} s)", "", f"`{r['command']}`", ""]
        if r.get("skipped"):
            lines += [f"skipped: {r['skipped']}", ""]
            continue
        lines += ["```", r["output"].strip(), "```", ""]
        lines += [f"**failed:** {r['error']}", ""] if r["error"] else [r["table"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="gpu-suite", help="folder for gpu_suite.json and .md")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests the suite)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip stages past this")
    p.add_argument("--eager-only", action="store_true", help="skip the compiled stages")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, results, start = environment(), [], time.perf_counter()
    for stage in (s for s in STAGES if not (args.eager_only and s.compiled)):
        left = args.budget_s - (time.perf_counter() - start)
        if not args.smoke and stage.cost_s > left:
            results.append({"name": stage.name, "command": stage.script, "seconds": 0,
                            "skipped": f"needs ~{stage.cost_s:.0f} s, {left:.0f} s left"})  # fmt: skip
            continue
        print(f"[{time.perf_counter() - start:6.1f} s] {stage.name}", flush=True)
        result = run_stage(stage, args.smoke)
        add_mfu(result["rows"], env.get("device"))
        results.append(result)
        print(result["error"] or result["table"], flush=True)
    payload = {"environment": env, "stages": results}
    (out / "gpu_suite.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(env, results))
    failed = [r["name"] for r in results if r.get("error")]
    print(f"wrote {out}/gpu_suite.json and gpu_suite.md; failed stages: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
