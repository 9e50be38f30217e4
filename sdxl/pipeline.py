"""Text to image with SDXL: prompt encoding, classifier-free guidance, sampling, VAE decode.

Image i of a call depends only on (seed, its global index): its initial noise is drawn on the CPU
from its own generator, exactly as diffusers does with one CPU generator per image, so results
do not depend on batch size, device or number of workers, and compare with diffusers pixel for
pixel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl.conditioning import (
    TextConditioning,
    encode_text,
    guidance_on,
    guided_eps,
    guided_model,
    unet_conditioning,
)
from sdxl.sampling import loop, samplers
from sdxl.text import load_tokenizers
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


@dataclass(frozen=True)
class SampleSettings:
    """How to draw images from prompts: everything but the prompts and the images' indices."""

    negative_prompt: str = ""
    width: int | None = None  # None: the size the model was trained at
    height: int | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 5.0  # classifier-free guidance; 1 or less: off (no negative pass)
    sampler: str = "euler"  # a name in sdxl.sampling.samplers.SAMPLERS
    seed: int = 0  # image i's noise is seeded with seed + its index
    guidance_rescale: float = 0.0  # CFG rescale phi (Lin et al. 2023, section 3.4); 0: off

    def __post_init__(self) -> None:
        samplers.check_sampler(self.sampler)

    @property
    def guided(self) -> bool:
        return guidance_on(self.guidance_scale)


def image_indices(batch: int, indices: list[int] | None) -> list[int]:
    """The images' global indices, one per prompt (default 0..B-1)."""
    indices = list(range(batch)) if indices is None else list(indices)
    if len(indices) != batch:
        raise ValueError(f"got {len(indices)} indices for {batch} prompts")
    return indices


@dataclass
class SDXLPipeline:
    """The loaded networks plus what the model folder says about sampling."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]  # (CLIP-L, bigG); () when prompts come encoded
    tokenizers: tuple
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = True
    source: str = ""
    sample_size: int = 128  # the UNet config's latent size: the resolution SDXL was trained at
    fast: FastPath = field(default_factory=lambda: FastPath())
    _guided: Callable = field(default=None, init=False, repr=False)  # guided_eps, maybe compiled
    _decode: Callable | None = field(default=None, init=False, repr=False)  # compiled vae.decode
    _loops: dict = field(default_factory=dict, init=False, repr=False)  # StaticLoop per shape

    def __post_init__(self) -> None:
        self.use_fast_path(self.fast)

    def use_fast_path(self, fast: FastPath) -> None:
        """Compile the guided UNet and the VAE decode, and/or capture the step as a CUDA graph.

        Call after LoRAs are applied (merged weights are then what the kernels read); graphs
        are recorded lazily, one per (sampler, steps, guidance, latent shape).
        """
        if fast.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline is on {self.device}")
        if fast.channels_last:  # NHWC convolutions: faster with cuDNN on tensor cores
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self._guided = compiled(guided_eps, fast) if fast.compile else guided_eps
        self._decode = compiled(self.vae.decode, fast) if fast.compile else None
        self._loops, self.fast = {}, fast

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

    def image_size(self, settings: SampleSettings) -> tuple[int, int]:
        """(width, height) of the settings' images; either left out is the trained size."""
        return settings.width or self.default_size, settings.height or self.default_size

    def check_size(self, width: int, height: int) -> None:
        check_image_size(width, height, self.vae_scale_factor, self.default_size)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | str,
        settings: SampleSettings = SampleSettings(),
        *,
        indices: list[int] | None = None,
        callback: loop.Callback | None = None,
        batch_invariant: bool = False,
    ) -> list[Image.Image]:
        """Generate one image per prompt; image i uses noise seeded with seed + indices[i].

        `indices` are the images' global indices in a larger dataset (default 0..B-1);
        `callback(i, x, x0)` runs after each sampler step. With `batch_invariant`, each image
        runs through the networks on its own (CFG pair still one UNet call), so it is
        bit-identical whatever the batch size: matmul kernels pick different blockings for
        different batch shapes, which moves the last bits otherwise.
        """
        if batch_invariant:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            indices = image_indices(len(prompts), indices)
            return [
                self.generate([p], settings, indices=[i], callback=callback)[0]
                for p, i in zip(prompts, indices, strict=True)
            ]
        latents = self.generate_latents(prompts, settings, indices=indices, callback=callback)
        return to_pil(self.decode(latents))

    @torch.inference_mode()
    def generate_latents(
        self,
        prompts: list[str] | str,
        settings: SampleSettings = SampleSettings(),
        *,
        indices: list[int] | None = None,
        callback: loop.Callback | None = None,
    ) -> torch.Tensor:
        """Denoised latents (B,4,H/8,W/8) in VAE space (not yet divided by the scaling factor)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_size(*self.image_size(settings))  # before the text encoders run
        indices = image_indices(len(prompts), indices)
        text = encode_text(self.tokenizers, self.text_encoders, prompts,
                           [settings.negative_prompt] if settings.guided else None,
                           zero_empty=self.force_zeros_for_empty_prompt, indices=indices)  # fmt: skip
        return self.sample_latents(text, settings, indices=indices, callback=callback)

    @torch.no_grad()  # not inference_mode: the Validator samples with the UNet being trained
    def sample_latents(
        self,
        text: TextConditioning,
        settings: SampleSettings,
        *,
        indices: list[int] | None = None,
        callback: loop.Callback | None = None,
    ) -> torch.Tensor:
        """generate_latents for prompts encoded already: seeded noise, CFG, the sampler's loop.

        The size is not checked here: the Validator draws any multiple of 8, as it always has.
        """
        width, height = self.image_size(settings)
        indices = image_indices(text.embeds.shape[0], indices)
        generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in indices]
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # fmt: skip
        noise = torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        ).to(self.device)
        cond = unet_conditioning(text, width, height, settings.guided, self.dtype, self.device)
        plan = samplers.plan(settings.sampler, noise, settings.num_inference_steps,
                             self.scheduler_config, generators)  # fmt: skip
        return self._run(plan, noise, cond, settings, callback)

    def _run(self, plan: samplers.Plan, noise: torch.Tensor, cond: dict, settings: SampleSettings,
             callback: loop.Callback | None) -> torch.Tensor:  # fmt: skip
        """The plan's loop: eager, or replayed on the static buffers of its (settings, shape)."""
        make_model = partial(self._model, guidance_scale=settings.guidance_scale,
                             guidance_rescale=settings.guidance_rescale)  # fmt: skip
        if not self.fast.cuda_graphs:
            return loop.run_steps(loop.start(plan, make_model(cond), noise), plan.num_steps,
                                  callback)  # fmt: skip
        key = (settings.sampler, settings.num_inference_steps, settings.guidance_scale,
               settings.guidance_rescale, tuple(noise.shape))  # fmt: skip
        if key not in self._loops:
            capture = self.device.type == "cuda"  # False only when tests run the loop on CPU
            self._loops[key] = loop.StaticLoop(plan, noise, cond, make_model, capture)
        return self._loops[key].run(plan, noise, cond, callback)

    def _model(self, cond: dict, guidance_scale: float, guidance_rescale: float) -> samplers.Model:
        """The sampler's guided model over `cond`, through the (maybe compiled) guided UNet."""
        return guided_model(self.unet, cond, guidance_scale, guidance_rescale, self._guided)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to images in [0, 1]."""
        return decode_latents(self.vae, latents, self._decode)


@dataclass(frozen=True)
class FastPath:
    """How the denoising loop and the VAE decode run: these choose kernels, never the maths.

    In fp32 on the CPU they leave images unchanged (see tests/test_denoise_step.py); on a GPU
    in bf16 they may move the last bit of some pixels, as a different batch size does, so they
    are not part of an image's recorded parameters.
    """

    compile: bool = False  # torch.compile the guided UNet and the VAE decode (fullgraph, static)
    cuda_graphs: bool = False  # replay the whole denoise step as one CUDA graph per shape
    channels_last: bool = False  # NHWC weights for the UNet and VAE convolutions
    backend: str | Callable = "inductor"  # torch.compile backend ("aot_eager" in CPU tests)

    @classmethod
    def default(cls, device: str | torch.device, compile: bool | None = None,
                channels_last: bool = False) -> FastPath:  # fmt: skip
        """Compile + CUDA graphs on CUDA, eager on the CPU, unless `compile` says otherwise."""
        cuda = torch.device(device).type == "cuda"
        compile = cuda if compile is None else compile
        return cls(compile=compile, cuda_graphs=compile and cuda, channels_last=channels_last)


def compiled(fn: Callable, fast: FastPath) -> Callable:
    """`fn` under torch.compile: one graph, shapes static (a new size is a new graph, not a
    dynamic-shape one: CUDA graphs and the fastest kernels are per shape anyway)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=fast.backend)


@torch.inference_mode()
def decode_latents(
    vae: torch.nn.Module, latents: torch.Tensor, decode: Callable | None = None
) -> torch.Tensor:
    """Latents -> images in [0, 1]; retries in fp32 (eagerly) if a low-precision decode overflows.

    `decode`: vae.decode or a compiled version of it.
    """
    vae_dtype = next(vae.parameters()).dtype
    z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).device)
    images = (decode or vae.decode)(z.to(vae_dtype)).float()
    if vae_dtype != torch.float32 and not torch.isfinite(images).all():
        log.warning("VAE decode in %s produced non-finite values; retrying in fp32", vae_dtype)
        try:
            images = vae.float().decode(z.float())
        finally:  # the VAE is shared: an error (e.g. out of memory) must not leave it in fp32
            vae.to(vae_dtype)
    return (images / 2 + 0.5).clamp(0, 1)


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
    from sdxl.models.networks import MODEL_CLASSES

    dtype = to_dtype(dtype)
    source_str = str(source)
    folder = weights.check_model_source(source)  # before any download: a wrong file fails fast
    if folder.is_file():
        config_dir = Path(config_source) if config_source else fetch_config_files()
        modules = weights.load_single_file(
            folder, model_classes=MODEL_CLASSES, dtype=dtype, device=device, config_dir=config_dir
        )
    else:
        config_dir = folder
        modules = {
            n: weights.load_component(
                folder, n, model_cls=cls, dtype=dtype, device=device, variant=variant
            )
            for n, cls in MODEL_CLASSES.items()
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
