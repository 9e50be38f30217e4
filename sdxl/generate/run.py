"""Generate a numbered image dataset with one worker per device, resuming where a run stopped.

Image i always gets prompt i and noise seed + i, so the dataset is the same whatever the batch
size, the number of workers, or how often the job was killed and rerun. Each image is written
as soon as it is decoded (PNG last, atomically), and a rerun skips images already complete.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sdxl.generate.coco import write_dataset_files
from sdxl.generate.writers import index_width, is_complete, write_item

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that determines the generated images."""

    pretrained_model: str
    output_dir: str
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler"
    seed: int = 0
    batch_size: int = 1
    precision: str = "bf16"
    device: str = "auto"
    save_metadata: bool = False
    output_format: str = "coco"
    loras: tuple[tuple[str, float], ...] = ()
    merge_loras: bool = True

    def __post_init__(self):
        from sdxl.pipeline import check_image_size
        from sdxl.schedulers import check_sampler

        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_inference_steps < 1:
            raise ValueError(
                f"--num-inference-steps must be at least 1, got {self.num_inference_steps}"
            )
        if self.output_format not in ("coco", "simple"):
            raise ValueError(f"--output-format must be coco or simple, got {self.output_format!r}")
        empty = [i for i, p in enumerate(self.prompts) if not p.strip()]
        if empty:
            raise ValueError(f"prompts {empty[:10]} are empty; remove them or write a prompt")
        check_sampler(self.sampler)
        check_image_size(self.width, self.height)
        for path, _ in self.loras:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--lora-checkpoint {path}: file not found")

    @property
    def stem_width(self) -> int:
        return index_width(len(self.prompts))

    def file_stem(self, index: int) -> str:
        return f"{index:0{self.stem_width}d}"


def resolve_devices(device: str, num_workers: int | None) -> list[str]:
    """One device string per worker. CPU workers are processes on the same CPU (for tests)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * (num_workers or 1)
    available = torch.cuda.device_count()
    if available == 0:
        raise RuntimeError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    n = num_workers or available
    if n > available:
        raise ValueError(f"--num-gpus {n} asked for, but only {available} GPU(s) are visible")
    return [f"cuda:{i}" for i in range(n)]


def image_meta(cfg: GenerateConfig, index: int) -> dict:
    """Per-image metadata: enough to regenerate exactly this image."""
    return {
        "index": index,
        "file_name": f"{cfg.file_stem(index)}.png",
        "prompt": cfg.prompts[index],
        "negative_prompt": cfg.negative_prompt,
        "seed": cfg.seed + index,
        "base_seed": cfg.seed,
        "sampler": cfg.sampler,
        "steps": cfg.num_inference_steps,
        "cfg_scale": cfg.guidance_scale,
        "size": f"{cfg.width}x{cfg.height}",
        "width": cfg.width,
        "height": cfg.height,
        "model": cfg.pretrained_model,
        "lora": ", ".join(f"{Path(p).name}:{s:g}" for p, s in cfg.loras),
        "precision": cfg.precision,
    }


def pending_indices(cfg: GenerateConfig, indices: list[int]) -> list[int]:
    """The indices whose PNG is missing or unreadable (a crash mid-write is regenerated)."""
    out = Path(cfg.output_dir)
    return [i for i in indices if not is_complete(out / f"{cfg.file_stem(i)}.png")]


def load_generation_pipeline(cfg: GenerateConfig, device: str):
    """The pipeline on `device` (fp32 on CPU) with the LoRAs applied, merged for speed."""
    from sdxl.lora import apply_loras
    from sdxl.lora_formats import load_lora_file
    from sdxl.pipeline import load_pipeline

    dtype = "fp32" if device == "cpu" else cfg.precision
    pipe = load_pipeline(cfg.pretrained_model, device=device, dtype=dtype)
    if cfg.loras:
        states = [(load_lora_file(path, pipe.unet)[0], scale) for path, scale in cfg.loras]
        apply_loras(pipe.unet, states, merge=cfg.merge_loras)
    return pipe


def generate_indices(cfg: GenerateConfig, indices: list[int], device: str = "cpu",
                     pipe=None, position: int = 0) -> int:  # fmt: skip
    """Generate the images at `indices` that are not done yet; return how many were made."""
    todo = pending_indices(cfg, indices)
    if not todo:
        return 0
    pipe = pipe or load_generation_pipeline(cfg, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json = cfg.save_metadata and cfg.output_format == "coco"
    # fp32 (always on CPU): bit-identical images for any batch size; bf16/fp16 on GPU: batched.
    exact = pipe.dtype == torch.float32
    with tqdm(total=len(todo), desc=f"images[{device}]", unit="img", position=position) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            images = pipe.generate(
                [cfg.prompts[i] for i in batch], negative_prompt=cfg.negative_prompt,
                width=cfg.width, height=cfg.height, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale, sampler=cfg.sampler, seed=cfg.seed,
                indices=batch, batch_invariant=exact,
            )  # fmt: skip
            for i, image in zip(batch, images, strict=True):
                meta = image_meta(cfg, i)
                if cfg.output_format == "coco":
                    write_item(out, cfg.file_stem(i), image, meta, save_json)
                else:
                    write_item(out, cfg.file_stem(i), image, meta, False, caption=False)
            bar.update(len(batch))
    return len(todo)


def _worker(
    cfg: GenerateConfig, indices: list[int], device: str, rank: int, threads: int, errors
) -> None:
    """Entry point of one worker process; reports its traceback to the parent on failure."""
    try:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        generate_indices(cfg, indices, device, position=rank)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_workers(cfg: GenerateConfig, indices: list[int], devices: list[str]) -> None:
    """One process per device over a strided share of `indices`; the first failure stops all."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs = [
        ctx.Process(target=_worker, args=(cfg, indices[w :: len(devices)], dev, w, threads, errors))
        for w, dev in enumerate(devices)
    ]
    for p in procs:
        p.start()
    failed = None
    while any(p.is_alive() for p in procs) and failed is None:
        for p in procs:
            p.join(timeout=0.2)
            if p.exitcode not in (None, 0):
                failed = p
                break
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join()
    bad = [(w, p.exitcode) for w, p in enumerate(procs) if p.exitcode != 0]
    if failed is not None or bad:
        try:
            rank, tb = errors.get(timeout=1.0)
        except queue.Empty:
            rank, tb = bad[0][0], f"exit code {bad[0][1]} (killed?)"
        raise RuntimeError(f"generation worker {rank} ({devices[rank]}) failed:\n{tb}")


def generate_dataset(cfg: GenerateConfig, num_workers: int | None = None,
                     indices: list[int] | None = None) -> int:  # fmt: skip
    """Generate (or finish) the dataset, then write captions.json, metadata.jsonl, contact sheet.

    Returns the number of images made by this call.
    """
    indices = list(range(len(cfg.prompts))) if indices is None else indices
    devices = resolve_devices(cfg.device, num_workers)
    before = len(pending_indices(cfg, indices))
    if len(devices) == 1:
        generate_indices(cfg, indices, devices[0])
    elif before:
        run_workers(cfg, indices, devices)
    if cfg.output_format == "coco":
        finalize_dataset(cfg, indices)
    return before


def finalize_dataset(cfg: GenerateConfig, indices: list[int], out_dir: Path | None = None) -> None:
    """Write the dataset-level files for `indices` (all must be complete)."""
    missing = pending_indices(cfg, indices)
    if missing:
        raise RuntimeError(
            f"{len(missing)} images are missing (e.g. index {missing[0]}); rerun to finish"
        )
    records = [image_meta(cfg, i) for i in indices]
    write_dataset_files(
        out_dir or Path(cfg.output_dir), records, f"generated by {cfg.pretrained_model}"
    )
