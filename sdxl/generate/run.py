"""Generate a numbered image dataset on one device, resuming where an earlier run stopped."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from sdxl.generate.writers import index_width, is_complete, write_item

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that determines the generated images (written beside them)."""

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
    loras: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_inference_steps < 1:
            raise ValueError(f"--num-inference-steps must be at least 1, got {self.num_inference_steps}")
        if self.output_format not in ("coco", "simple"):
            raise ValueError(f"--output-format must be coco or simple, got {self.output_format!r}")


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return name


def image_meta(cfg: GenerateConfig, index: int) -> dict:
    """Per-image metadata: enough to regenerate exactly this image."""
    return {
        "index": index,
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
        "lora": ", ".join(cfg.loras),
        "precision": cfg.precision,
    }


def pending_indices(cfg: GenerateConfig, indices: list[int]) -> list[int]:
    """The indices whose PNG is missing or unreadable."""
    width = index_width(len(cfg.prompts))
    out = Path(cfg.output_dir)
    return [i for i in indices if not is_complete(out / f"{i:0{width}d}.png")]


def generate_indices(cfg: GenerateConfig, indices: list[int], pipe=None) -> int:
    """Generate the images at `indices` that are not done yet; return how many were made."""
    from sdxl.pipeline import load_pipeline

    todo = pending_indices(cfg, indices)
    if not todo:
        return 0
    if pipe is None:
        device = resolve_device(cfg.device)
        dtype = cfg.precision if device != "cpu" else "fp32"
        pipe = load_pipeline(cfg.pretrained_model, device=device, dtype=dtype)
    out, width = Path(cfg.output_dir), index_width(len(cfg.prompts))
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="images", unit="img")
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start : start + cfg.batch_size]
        images = pipe.generate(
            [cfg.prompts[i] for i in batch], negative_prompt=cfg.negative_prompt,
            width=cfg.width, height=cfg.height, num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale, sampler=cfg.sampler, seed=cfg.seed, indices=batch,
        )  # fmt: skip
        for i, image in zip(batch, images, strict=True):
            meta = image_meta(cfg, i)
            write_item(out, f"{i:0{width}d}", image, meta, cfg.save_metadata and cfg.output_format == "coco")
        bar.update(len(batch))
    bar.close()
    return len(todo)


def config_dict(cfg: GenerateConfig) -> dict:
    return asdict(cfg)
