"""Fixed-seed validation grids during training.

Prompts are encoded once at start (the text encoders are then freed) and the VAE waits on the
CPU between runs, so training keeps only the UNet on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl import schedulers
from sdxl.images import make_grid
from sdxl.pipeline import decode_latents, guided_model, to_pil
from sdxl.text import encode_prompts, load_tokenizers
from sdxl.utils import atomic_path
from sdxl.weights import load_component


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

    @torch.no_grad()
    def run(self, unet: torch.nn.Module, step: int, out_dir: Path) -> Path:
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
        path = out_dir / "samples" / f"step-{step:07d}.png"
        with atomic_path(path) as tmp:
            make_grid(images, self.prompts).save(tmp, format="PNG")
        return path
