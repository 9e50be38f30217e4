"""What the benchmark scripts share: flags, device, timing, peak memory, the diffusers UNet, tables.

Each script puts the repository root on sys.path before importing this module.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdxl.models.configs import SDXL_BASE, TINY, UNetConfig
from sdxl.models.unet import UNet2DConditionModel
from sdxl.utils import to_dtype

TOKENS = 77  # CLIP context length

# ----------------------------------------------------------------------------- flags


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """--config, read by `load_config`."""
    p.add_argument("--config", default="sdxl", help="sdxl | tiny | path to a unet config.json")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --device, read by `device_and_dtype`."""
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 (GPU), fp32 (CPU)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def add_timing_args(p: argparse.ArgumentParser, warmup: int, iters: int) -> None:
    """--warmup, --iters and --compare (time diffusers too, on the same weights and inputs)."""
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--compare", choices=["none", "diffusers"], default="none")


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


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype; the dtype defaults to bf16 on a GPU and fp32 on the CPU."""
    device = pick_device(args.device)
    return device, to_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))


def device_line(device: torch.device) -> str:
    """The first header line of every benchmark: what the numbers were measured on."""
    name = platform.processor()
    if device.type == "cuda":
        name = (
            f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    return (
        f"device: {device.type} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )


# ----------------------------------------------------------------------------- UNets


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


def diffusers_forward(unet: nn.Module, sample, timestep, encoder_hidden_states, text_embeds,
                      time_ids) -> torch.Tensor:  # fmt: skip
    """diffusers' UNet called the way ours is called."""
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added).sample


def set_checkpointing(impl: str, model: nn.Module, mode: bool | str) -> None:
    """Gradient checkpointing on either UNet (diffusers' has only off and full)."""
    if impl != "diffusers":
        model.set_gradient_checkpointing(mode)
    elif mode not in (False, "none"):
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def pooled_dim(cfg: dict) -> int:
    """Width of the pooled text embedding: the add-embedding input less the six size ids."""
    return cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]


def square_time_ids(batch: int, res: int) -> torch.Tensor:
    """SDXL's size ids (original size, crop corner, target size) of uncropped res x res images."""
    return torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(batch, 1)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_first_call(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call (the first includes compilation and graph capture), and its result."""
    sync(device)
    t0 = time.perf_counter()
    result = call()
    sync(device)
    return time.perf_counter() - t0, result


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


def measure_or_explain(measure: Callable[[], dict], failed: dict, name: str, compiled: bool,
                       device: torch.device) -> dict:  # fmt: skip
    """measure()'s row; out of memory, or a failing torch.compile, is the row's "mem" text."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        return {**failed, "mem": "OOM"}
    except Exception as e:  # inductor needs a working C/C++ toolchain; say why and go on
        if not compiled:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"{name}: torch.compile failed: {type(e).__name__}: {first}")
        return {**failed, "mem": "compile failed"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- results


def add_ratios(rows: list[dict], field: str, same: Sequence[str],
               is_reference: Callable[[dict], bool] = lambda r: r["impl"] == "diffusers",
               ) -> list[dict]:  # fmt: skip
    """ratio = a row's `field` over the reference row's with equal `same` keys ("-" if none)."""
    ref = {tuple(r[k] for k in same): r[field] for r in rows if is_reference(r)}
    for r in rows:
        base = ref.get(tuple(r[k] for k in same))
        r["ratio"] = f"{r[field] / base:.2f}" if base and r[field] else "-"
    return rows


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def markdown_table(columns: Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> str:
    """A markdown table for BENCHMARKS.md; `align` has one letter per column: l or r."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
