"""Fixed-seed sample grids: during training (the CLI), or over a run's saved LoRA files.

Each prompt is a SamplePrompt (sdxl/train/sample_prompts.py: kohya's --n/--w/--h/--d/--s/--l)
drawn at its own size, seed, steps, guidance and negative prompt with Euler, as generation
would draw it. Prompts are encoded once at start (the text encoders are then freed) and the VAE
waits on the CPU between grids, so training keeps only the UNet on the GPU. `validate_run` (the
workflow's validate_lora rule) draws one grid per snapshot, plus the base model's as step 0,
and keeps the grids already drawn from the same file with the same settings, so continuing a
run draws only the new snapshots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sdxl.conditioning import TextConditioning, encode_text
from sdxl.images import make_grid
from sdxl.models.clip import CLIPTextModel
from sdxl.models.unet import UNet2DConditionModel
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SampleSettings, SDXLPipeline, to_pil
from sdxl.text import load_tokenizers
from sdxl.train.sample_prompts import SamplePrompt
from sdxl.utils import atomic_path, atomic_write_text
from sdxl.weights import load_component, load_vae

log = logging.getLogger(__name__)
GRID_KEY = "sdxl-validation"  # the PNG text chunk with what a grid was drawn from


class Validator:
    """Draws `samples` side by side through the generation pipeline (Euler); saves a grid per call."""

    def __init__(self, model_dir: Path, samples: list[SamplePrompt], scheduler_config: dict):
        from sdxl.weights import model_identity

        model_dir = Path(model_dir)
        self.samples, self.scheduler_config = list(samples), scheduler_config
        index = model_dir / "model_index.json"
        index = json.loads(index.read_text()) if index.is_file() else {}
        self.zero_empty = index.get("force_zeros_for_empty_prompt", True)
        self.encode(load_tokenizers(model_dir), list(_text_encoders(model_dir).values()))
        self.vae = load_vae(model_dir, model_cls=AutoencoderKL, device="cpu", dtype=torch.float32)
        self.key = json.dumps({"samples": [asdict(s) for s in self.samples],
                               "model_id": model_identity(model_dir)}, sort_keys=True)  # fmt: skip
        self.drawn: set[int] = set()  # steps this validator has drawn

    def encode(self, tokenizers, encoders) -> None:
        """Encode the prompts (one batch) and their negatives (another) with these encoders;
        an empty negative is all zeros when the model says so, as generation encodes it."""
        self.text = encode_text(tokenizers, encoders, [s.prompt for s in self.samples],
                                [s.negative for s in self.samples], zero_empty=self.zero_empty)  # fmt: skip

    def run(
        self, unet: torch.nn.Module, step: int, out_dir: Path, keep: bool = False
    ) -> Path | None:
        """Draw the grid of `unet` as it is at `step` into out_dir/samples (the CLI's layout).

        None when nothing was drawn: this validator already drew `step`, or `keep` and the
        grid there was drawn from these samples and model.
        """
        path = out_dir / "samples" / f"step-{step:07d}.png"
        if step in self.drawn or (keep and _recorded_key(path) == self.key):
            return None
        save_grid(self.grid(unet), path, self.key)
        self.drawn.add(step)
        return path

    @torch.no_grad()
    def grid(self, unet: torch.nn.Module) -> Image.Image:
        """The samples side by side, each captioned with its prompt."""
        was_training = unet.training
        unet.eval()
        device = next(unet.parameters()).device
        self.vae.to(device)
        pipe = self.pipeline(unet)
        try:
            images = [self.image(pipe, k) for k in range(len(self.samples))]
        finally:
            self.vae.to("cpu")
            unet.train(was_training)
        return make_grid(images, [s.prompt for s in self.samples])

    def pipeline(self, unet: torch.nn.Module) -> SDXLPipeline:
        """The pipeline that draws the samples: no text encoders (the prompts are in self.text)."""
        return SDXLPipeline(unet=unet, vae=self.vae, text_encoders=(), tokenizers=(),
                            scheduler_config=self.scheduler_config)  # fmt: skip

    def image(self, pipe: SDXLPipeline, k: int) -> Image.Image:
        """Sample k as generate_images.py would draw it (Euler, its seed, size, steps, cfg);
        its prompt and negative prompt are encoded already (self.text)."""
        s, t = self.samples[k], self.text
        settings = SampleSettings(width=s.width, height=s.height, num_inference_steps=s.steps,
                                  guidance_scale=s.guidance, sampler="euler", seed=s.seed)  # fmt: skip
        text = TextConditioning(t.embeds[k : k + 1], t.pooled[k : k + 1],
                                t.neg_embeds[k : k + 1], t.neg_pooled[k : k + 1])  # fmt: skip
        return to_pil(pipe.decode(pipe.sample_latents(text, settings)))[0]


def validate_run(lora_files: dict[int, Path | None], model_dir: Path, samples: list[SamplePrompt],
                 out_dir: Path, device: str = "cpu", precision: str = "fp32",
                 code_version: str = "", run: str = "") -> dict:  # fmt: skip
    """A grid per LoRA file (step -> file; None: the base model) in out_dir, and index.json.

    A grid is kept when it was drawn from a file with the same sha256 under the same settings
    (recorded in the PNG); grids of steps no longer wanted are removed.
    """
    from sdxl.utils import sha256_file
    from sdxl.weights import model_identity

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"samples": [asdict(s) for s in samples], "precision": precision,
                "model_id": model_identity(model_dir), "code": code_version}  # fmt: skip
    grids, todo = [], []
    for step, path in sorted(lora_files.items()) if samples else []:
        entry = {"step": step, "lora": path.name if path else None,
                 "sha256": sha256_file(path) if path else None, "file": f"step-{step:07d}.png"}  # fmt: skip
        grids.append(entry)
        key = json.dumps({**settings, "lora_sha256": entry["sha256"]}, sort_keys=True)
        if _recorded_key(out_dir / entry["file"]) != key:
            todo.append((path, out_dir / entry["file"], key))
    for old in out_dir.glob("step-*.png"):
        if old.name not in {g["file"] for g in grids}:
            old.unlink()
    if todo:
        _draw(todo, model_dir, samples, device, precision)
    log.info("validation grids: %d drawn, %d kept", len(todo), len(grids) - len(todo))
    index = {"run": run, "prompts": [s.prompt for s in samples],
             "samples": settings["samples"], "size": max((s.width for s in samples), default=0),
             "grids": grids}  # fmt: skip
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    return index


def _draw(todo, model_dir, samples, device, precision) -> None:
    """Load the model once and draw each (LoRA file or None, grid path, key) of `todo`; a file
    with text-encoder parts (kohya lora_te1/2_) re-encodes the prompts through them."""
    from sdxl.lora import remove_lora
    from sdxl.lora_formats import load_lora_file
    from sdxl.noise_schedule import read_scheduler_config
    from sdxl.text_lora import TEXT_ENCODERS, apply_component_loras, split_components
    from sdxl.utils import to_dtype

    validator = Validator(Path(model_dir), samples, read_scheduler_config(Path(model_dir))[0])
    networks = {"unet": load_component(model_dir, "unet", model_cls=UNet2DConditionModel,
                                       dtype=to_dtype(precision), device=device)}  # fmt: skip
    text_lora = False  # whether validator.text came through a text-encoder LoRA
    for lora, grid_path, key in todo:
        state = load_lora_file(lora, networks["unet"], text_encoders=True)[0] if lora else {}
        touched = set(split_components(state))
        if (touched - {"unet"} or text_lora) and "text_encoder" not in networks:
            networks |= _text_encoders(model_dir)  # once, when first needed
        apply_component_loras(networks, [(state, 1.0)])
        if touched - {"unet"} or text_lora:
            validator.encode(load_tokenizers(model_dir), [networks[n] for n in TEXT_ENCODERS])
            text_lora = bool(touched - {"unet"})
        save_grid(validator.grid(networks["unet"]), grid_path, key)
        for name in touched:
            remove_lora(networks[name])  # back to the base weights for the next file


def _text_encoders(model_dir: Path) -> dict[str, torch.nn.Module]:
    """Both CLIP text encoders, fp32 on the CPU (they encode a few prompts, then wait)."""
    from sdxl.text_lora import TEXT_ENCODERS

    return {n: load_component(model_dir, n, model_cls=CLIPTextModel, dtype=torch.float32,
                              device="cpu") for n in TEXT_ENCODERS}  # fmt: skip


def save_grid(image: Image.Image, path: Path, key: str) -> None:
    """The grid as a PNG that records `key` (what it was drawn from) in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(GRID_KEY, key)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _recorded_key(path: Path) -> str | None:
    """The settings a grid PNG was drawn with, or None (missing, unreadable, not ours)."""
    try:
        with Image.open(path, formats=["PNG"]) as image:
            return image.info.get(GRID_KEY)
    except (OSError, SyntaxError, ValueError):
        return None
