"""Text to image with SDXL: prompt encoding, classifier-free guidance, sampling, VAE decode.

Image i of a call depends only on (seed, its global index): its initial noise is drawn on the CPU
from its own generator, exactly as diffusers does with one CPU generator per image, so results
do not depend on batch size, device or number of workers, and compare with diffusers pixel for
pixel.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl import schedulers
from sdxl.text import encode_prompts, load_tokenizers
from sdxl.utils import to_dtype

log = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 64, 4096


def check_image_size(width: int, height: int, factor: int = 8, trained: int | None = None) -> None:
    """Reject sizes the VAE/UNet cannot take, with a message that says what would work."""
    hint = f" (this model was trained at {trained})" if trained else ""
    for name, value in (("width", width), ("height", height)):
        if not (MIN_SIZE <= value <= MAX_SIZE) or value % factor:
            raise ValueError(
                f"{name}={value} is not a valid image size: use a multiple of {factor} between "
                f"{MIN_SIZE} and {MAX_SIZE}{hint}"
            )


@dataclass
class SDXLPipeline:
    """The loaded networks plus what the model folder says about sampling."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, torch.nn.Module]
    tokenizers: tuple
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = True
    source: str = ""
    sample_size: int = 128  # the UNet config's latent size: the resolution SDXL was trained at

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def encode(
        self, prompts: list[str], indices: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds (B,77,D), pooled (B,P)); `indices` name the images in warnings."""
        return encode_prompts(self.tokenizers, self.text_encoders, prompts, indices=indices)

    def encode_negative(self, negative: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative conditioning; an empty negative prompt is all zeros, as SDXL base expects."""
        embeds, pooled = self.encode([negative])
        if not negative and self.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    def check_size(self, width: int, height: int) -> None:
        check_image_size(width, height, self.vae_scale_factor, self.default_size)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        sampler: str = "euler",
        seed: int = 0,
        guidance_rescale: float = 0.0,
        indices: list[int] | None = None,
        progress: bool = False,
        batch_invariant: bool = False,
    ) -> list[Image.Image]:
        """Generate one image per prompt; image i uses noise seeded with seed + indices[i].

        `indices` are the images' global indices in a larger dataset (default 0..B-1). With
        `batch_invariant`, each image runs through the networks on its own (CFG pair still one
        UNet call), so it is bit-identical whatever the batch size: matmul kernels pick
        different blockings for different batch shapes, which moves the last bits otherwise.
        """
        if batch_invariant:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            indices = list(range(len(prompts))) if indices is None else list(indices)
            return [
                self.generate([p], negative_prompt, width, height, num_inference_steps,
                              guidance_scale, sampler, seed, guidance_rescale, [i], progress)[0]
                for p, i in zip(prompts, indices, strict=True)
            ]  # fmt: skip
        latents = self.generate_latents(
            prompts, negative_prompt, width, height, num_inference_steps, guidance_scale,
            sampler, seed, guidance_rescale, indices, progress,
        )  # fmt: skip
        return to_pil(self.decode(latents))

    @torch.inference_mode()
    def generate_latents(
        self,
        prompts: list[str] | str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        sampler: str = "euler",
        seed: int = 0,
        guidance_rescale: float = 0.0,
        indices: list[int] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoised latents (B,4,H/8,W/8) in VAE space (not yet divided by the scaling factor)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        width, height = width or self.default_size, height or self.default_size
        self.check_size(width, height)
        schedulers.check_sampler(sampler)
        batch, device = len(prompts), self.device
        indices = list(range(batch)) if indices is None else list(indices)
        if len(indices) != batch:
            raise ValueError(f"got {len(indices)} indices for {batch} prompts")
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in indices]
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # fmt: skip
        noise = torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        )
        cond = self._conditioning(prompts, indices, negative_prompt, width, height, guidance_scale)
        model = guided_model(self.unet, cond, guidance_scale, guidance_rescale)
        return schedulers.sample(
            sampler, model, noise.to(device), num_inference_steps, self.scheduler_config,
            generators=generators, progress=progress,
        )  # fmt: skip

    def _conditioning(
        self, prompts: list[str], indices: list[int], negative: str, width: int, height: int,
        guidance: float,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """UNet conditioning for the batch, negatives first when guidance is on (as diffusers)."""
        embeds, pooled = self.encode(prompts, indices)
        batch = len(prompts)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
        time_ids = time_ids.to(self.device).expand(batch, -1)
        if guidance > 1.0:
            neg_embeds, neg_pooled = self.encode_negative(negative, batch)
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return {
            "encoder_hidden_states": embeds.to(self.dtype),
            "text_embeds": pooled.to(self.dtype),
            "time_ids": time_ids,
        }

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to images in [0, 1]."""
        return decode_latents(self.vae, latents)


@torch.inference_mode()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]; retries in fp32 if a low-precision decode overflows."""
    vae_dtype = next(vae.parameters()).dtype
    z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).device)
    images = vae.decode(z.to(vae_dtype)).float()
    if vae_dtype != torch.float32 and not torch.isfinite(images).all():
        log.warning("VAE decode in %s produced non-finite values; retrying in fp32", vae_dtype)
        try:
            images = vae.float().decode(z.float())
        finally:  # the VAE is shared: an error (e.g. out of memory) must not leave it in fp32
            vae.to(vae_dtype)
    return (images / 2 + 0.5).clamp(0, 1)


def guided_model(unet, cond: dict, guidance_scale: float, guidance_rescale: float):
    """The eps/v model for the sampler: one batched UNet call for both CFG branches."""
    guided = guidance_scale > 1.0
    dtype = cond["encoder_hidden_states"].dtype

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if guided else x
        out = unet(x_in.to(dtype), t, **cond).float()
        if not guided:
            return out
        uncond, text = out.chunk(2)
        guided_out = uncond + guidance_scale * (text - uncond)
        if guidance_rescale > 0:
            guided_out = rescale_guidance(guided_out, text, guidance_rescale)
        return guided_out

    return model


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, phi: float) -> torch.Tensor:
    """Rescale CFG output to the text branch's std (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", section 3.4)."""
    dims = list(range(1, guided.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_text / std_guided)
    return phi * rescaled + (1 - phi) * guided


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] -> PIL images, rounding as diffusers does."""
    arrays = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def load_pipeline(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    variant: str | None = None,
    config_source: str | Path | None = None,
) -> SDXLPipeline:
    """Load SDXL from a diffusers folder, a single-file `.safetensors`, or `builtin:tiny`.

    A single file holds no tokenizers or scheduler config: they come from `config_source`
    (a diffusers folder; default: the SDXL base 1.0 repo, downloading only those small files).
    """
    from sdxl import weights
    from sdxl.hub import fetch_config_files

    dtype = to_dtype(dtype)
    source_str = str(source)
    folder = weights.check_model_source(source)  # before any download: a wrong file fails fast
    if folder.is_file():
        config_dir = Path(config_source) if config_source else fetch_config_files()
        modules = weights.load_single_file(
            folder, dtype=dtype, device=device, config_dir=config_dir
        )
    else:
        config_dir = folder
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        modules = {
            n: weights.load_component(folder, n, dtype=dtype, device=device, variant=variant)
            for n in names
        }
    if dtype == torch.float16 and modules["vae"].config.force_upcast:
        modules["vae"].float()  # SDXL's VAE overflows in fp16 (diffusers upcasts it too)
    return _assemble(modules, config_dir, source_str)


def _assemble(modules: dict, config_dir: Path, source: str) -> SDXLPipeline:
    from sdxl.weights import WeightsError

    index_file = config_dir / "model_index.json"
    sched_file = config_dir / "scheduler" / "scheduler_config.json"
    for f in (index_file, sched_file):
        if not f.exists():
            raise WeightsError(f"{f}: missing; the model folder must be in diffusers layout "
                               "(download it again with download_weights.sh)")  # fmt: skip
    index = json.loads(index_file.read_text())
    unet_config = config_dir / "unet" / "config.json"
    sample_size = (
        json.loads(unet_config.read_text()).get("sample_size", 128) if unet_config.exists() else 128
    )
    return SDXLPipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=(modules["text_encoder"], modules["text_encoder_2"]),
        tokenizers=load_tokenizers(config_dir),
        scheduler_config=json.loads(sched_file.read_text()),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        source=source,
        sample_size=sample_size,
    )
