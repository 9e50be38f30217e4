"""Fixed-seed validation grids: during training (the CLI), or over a run's saved LoRA files.

Prompts are encoded once at start (the text encoders are then freed) and the VAE waits on the
CPU between runs, so training keeps only the UNet on the GPU. `validate_run` (the workflow's
validate_lora rule) draws one grid per snapshot and keeps the grids already drawn from the same
file with the same settings, so continuing a run draws only the new snapshots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sdxl import schedulers
from sdxl.images import make_grid
from sdxl.pipeline import decode_latents, guided_model, to_pil
from sdxl.text import encode_prompts, load_tokenizers
from sdxl.utils import atomic_path, atomic_write_text
from sdxl.weights import load_component

log = logging.getLogger(__name__)
GRID_KEY = "sdxl-validation"  # the PNG text chunk with what a grid was drawn from


class Validator:
    """Samples `prompts` with seeds seed+i at `size` px with Euler; saves a grid per call."""

    def __init__(self, model_dir: Path, prompts: list[str], size: int, guidance: float,
                 steps: int, seed: int, scheduler_config: dict):  # fmt: skip
        encoders = [load_component(model_dir, n, dtype=torch.float32, device="cpu")
                    for n in ("text_encoder", "text_encoder_2")]  # fmt: skip
        self.embeds, self.pooled = encode_prompts(load_tokenizers(model_dir), encoders, prompts)
        del encoders
        self.vae = load_component(model_dir, "vae", dtype=torch.float32, device="cpu")
        self.prompts, self.size, self.guidance = prompts, size, guidance
        self.steps, self.seed, self.scheduler_config = steps, seed, scheduler_config

    def run(self, unet: torch.nn.Module, step: int, out_dir: Path) -> Path:
        """Draw the grid of `unet` as it is at `step` into out_dir/samples (the CLI's layout)."""
        path = out_dir / "samples" / f"step-{step:07d}.png"
        with atomic_path(path) as tmp:
            self.grid(unet).save(tmp, format="PNG")
        return path

    @torch.no_grad()
    def grid(self, unet: torch.nn.Module) -> Image.Image:
        """The prompts side by side, seeds seed+i, sampled with Euler."""
        was_training = unet.training
        unet.eval()
        param = next(unet.parameters())
        n, latent = len(self.prompts), self.size // 8
        time_ids = torch.tensor([[self.size, self.size, 0, 0, self.size, self.size]] * n * 2)
        cond = {
            "encoder_hidden_states": torch.cat([torch.zeros_like(self.embeds), self.embeds]),
            "text_embeds": torch.cat([torch.zeros_like(self.pooled), self.pooled]),
            "time_ids": time_ids,
        }
        cond = {k: v.to(param.device, param.dtype) for k, v in cond.items()}
        gens = [torch.Generator("cpu").manual_seed(self.seed + i) for i in range(n)]
        noise = torch.cat([torch.randn((1, 4, latent, latent), generator=g) for g in gens])
        model = guided_model(unet, cond, self.guidance, 0.0)
        latents = schedulers.sample("euler", model, noise.to(param.device), self.steps,
                                    self.scheduler_config, generators=gens)  # fmt: skip
        self.vae.to(param.device)
        images = to_pil(decode_latents(self.vae, latents))
        self.vae.to("cpu")
        unet.train(was_training)
        return make_grid(images, self.prompts)


def validate_run(lora_files: dict[int, Path], model_dir: Path, prompts: list[str], size: int,
                 guidance: float, steps: int, seed: int, out_dir: Path, device: str = "cpu",
                 precision: str = "fp32", code_version: str = "", run: str = "") -> dict:  # fmt: skip
    """A grid per LoRA file (step -> file) in out_dir, and out_dir/index.json listing them.

    A grid is kept when it was drawn from a file with the same sha256 under the same settings
    (recorded in the PNG); grids of steps no longer wanted are removed.
    """
    from sdxl.prepare import sha256_file
    from sdxl.weights import model_identity

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"prompts": prompts, "size": size, "guidance_scale": guidance,
                "sampling_steps": steps, "seed": seed, "precision": precision,
                "model_id": model_identity(model_dir), "code": code_version}  # fmt: skip
    grids, todo = [], []
    for step, path in sorted(lora_files.items()) if prompts else []:
        entry = {"step": step, "lora": path.name, "sha256": sha256_file(path),
                 "file": f"step-{step:07d}.png"}  # fmt: skip
        grids.append(entry)
        key = json.dumps({**settings, "lora_sha256": entry["sha256"]}, sort_keys=True)
        if _recorded_key(out_dir / entry["file"]) != key:
            todo.append((path, out_dir / entry["file"], key))
    for old in out_dir.glob("step-*.png"):
        if old.name not in {g["file"] for g in grids}:
            old.unlink()
    if todo:
        _draw(todo, model_dir, prompts, size, guidance, steps, seed, device, precision)
    log.info("validation grids: %d drawn, %d kept", len(todo), len(grids) - len(todo))
    index = {"run": run, "prompts": prompts, "seed": seed, "size": size, "guidance_scale": guidance,
             "sampling_steps": steps, "grids": grids}  # fmt: skip
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    return index


def _draw(todo, model_dir, prompts, size, guidance, steps, seed, device, precision) -> None:
    """Load the model once and draw each (LoRA file, grid path, key) of `todo`."""
    from sdxl.lora import apply_loras, remove_lora
    from sdxl.lora_formats import load_lora_file
    from sdxl.utils import to_dtype

    sched = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
    validator = Validator(Path(model_dir), prompts, size, guidance, steps, seed, sched)
    unet = load_component(model_dir, "unet", dtype=to_dtype(precision), device=device)
    for lora, grid_path, key in todo:
        apply_loras(unet, [(load_lora_file(lora, unet)[0], 1.0)])
        image = validator.grid(unet)
        remove_lora(unet)  # back to the base weights for the next file
        info = PngImagePlugin.PngInfo()
        info.add_text(GRID_KEY, key)
        with atomic_path(grid_path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)


def _recorded_key(path: Path) -> str | None:
    """The settings a grid PNG was drawn with, or None (missing, unreadable, not ours)."""
    try:
        with Image.open(path, formats=["PNG"]) as image:
            return image.info.get(GRID_KEY)
    except (OSError, SyntaxError, ValueError):
        return None
