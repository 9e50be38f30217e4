"""What the UNet is conditioned on when drawing an image, and classifier-free guidance over it.

Generation (sdxl/pipeline.py) and the training's validation grids both go through here, so a
validation cell is drawn exactly as generation draws it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdxl.sampling.samplers import Model
from sdxl.text import encode_prompts


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts and, for classifier-free guidance, their negatives."""

    embeds: Tensor  # (B, 77, D)
    pooled: Tensor  # (B, P)
    neg_embeds: Tensor | None = None  # (B or 1, 77, D): a single row serves every prompt
    neg_pooled: Tensor | None = None  # (B or 1, P)


def encode_text(tokenizers, encoders, prompts: Sequence[str],
                negatives: Sequence[str] | None = None, *, zero_empty: bool = True,
                indices: Sequence[int] | None = None) -> TextConditioning:  # fmt: skip
    """The prompts (one batch) and the negatives (another), encoded; no negatives: no guidance.

    An empty negative prompt is all zeros with `zero_empty` (the model index's
    force_zeros_for_empty_prompt), as SDXL base expects. `indices` name images in warnings.
    """
    embeds, pooled = encode_prompts(tokenizers, encoders, prompts, indices=indices)
    if negatives is None:
        return TextConditioning(embeds, pooled)
    neg_embeds, neg_pooled = encode_prompts(tokenizers, encoders, negatives)
    if zero_empty:
        given = torch.tensor([bool(n) for n in negatives], device=neg_embeds.device)
        neg_embeds = torch.where(given[:, None, None], neg_embeds, 0.0)
        neg_pooled = torch.where(given[:, None], neg_pooled, 0.0)
    return TextConditioning(embeds, pooled, neg_embeds, neg_pooled)


def unet_conditioning(text: TextConditioning, width: int, height: int, guided: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    """The UNet's keyword inputs for the batch; with `guided`, negatives first (as diffusers).

    SDXL's micro-conditioning (time_ids) is the original size, crop (0, 0) and target size.
    """
    batch = text.embeds.shape[0]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
    time_ids = time_ids.to(device).expand(batch, -1)  # (B, 6)
    embeds, pooled = text.embeds, text.pooled
    if guided:
        assert text.neg_embeds is not None, "guidance needs the negative prompts' conditioning"
        embeds = torch.cat([text.neg_embeds.expand(batch, -1, -1), embeds])  # (2B, 77, D)
        pooled = torch.cat([text.neg_pooled.expand(batch, -1), pooled])  # (2B, P)
        time_ids = torch.cat([time_ids, time_ids])
    return {
        "encoder_hidden_states": embeds.to(device, dtype),
        "text_embeds": pooled.to(device, dtype),
        "time_ids": time_ids,
    }


def guidance_on(guidance_scale: float) -> bool:
    """Whether classifier-free guidance is on (a negative pass beside each prompt's): scales of
    1 or less are off, as in diffusers."""
    return guidance_scale > 1.0


def guided_eps(unet, x: Tensor, t: Tensor, cond: dict, guidance_scale: float,
               guidance_rescale: float) -> Tensor:  # fmt: skip
    """The guided eps/v prediction (B, C, H, W) fp32: both CFG branches in one UNet call.

    A plain function of tensors (and two constants), so torch.compile sees the CFG combine
    and the UNet as one graph.
    """
    guided = guidance_on(guidance_scale)
    x_in = torch.cat([x, x]) if guided else x  # (2B, C, H, W): negatives first, as diffusers
    out = unet(x_in.to(cond["encoder_hidden_states"].dtype), t, **cond).float()
    if not guided:
        return out
    uncond, text = out.chunk(2)
    guided_out = uncond + guidance_scale * (text - uncond)
    if guidance_rescale > 0:
        guided_out = rescale_guidance(guided_out, text, guidance_rescale)
    return guided_out


def guided_model(unet, cond: dict, guidance_scale: float, guidance_rescale: float,
                 forward: Callable = guided_eps) -> Model:  # fmt: skip
    """The sampler's model (x, t) -> eps/v: `forward` (guided_eps, maybe compiled) bound to `cond`."""
    return lambda x, t: forward(unet, x, t, cond, guidance_scale, guidance_rescale)


def rescale_guidance(guided: Tensor, text: Tensor, phi: float) -> Tensor:
    """Rescale CFG output to the text branch's std (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", section 3.4)."""
    dims = list(range(1, guided.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_text / std_guided)
    return phi * rescaled + (1 - phi) * guided
