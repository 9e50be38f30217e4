"""Prompt encoding for SDXL: two CLIP tokenizers, two text encoders, one conditioning.

The only module of `sdxl` that imports transformers (for its CLIPTokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from sdxl.models.clip import CLIPTextModel

logger = logging.getLogger(__name__)

MAX_LENGTH = 77  # CLIP's context: <|startoftext|> + 75 tokens + <|endoftext|>


def load_tokenizers(model_dir: str | Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Load SDXL's `tokenizer/` (CLIP-L, pads with EOS) and `tokenizer_2/` (bigG, pads with "!")."""
    model_dir = Path(model_dir)
    tokenizers = []
    for name in ("tokenizer", "tokenizer_2"):
        folder = model_dir / name
        if not (folder / "vocab.json").is_file():
            raise FileNotFoundError(f"no CLIP tokenizer (vocab.json) in {folder}")
        tokenizers.append(CLIPTokenizer.from_pretrained(folder))
    return tokenizers[0], tokenizers[1]


def tokenize(
    tokenizer: CLIPTokenizer, prompts: Sequence[str], warn: bool = True,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Token ids (B, 77) padded and truncated as SDXL was trained; log what truncation drops.

    `indices`: the images the prompts belong to, so the warning names image 1234 of a dataset
    rather than position 0 of a batch.
    """
    prompts = list(prompts)
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    if warn:
        _warn_truncated(tokenizer, prompts, indices)
    return ids


def _warn_truncated(
    tokenizer: CLIPTokenizer, prompts: list[str], indices: Sequence[int] | None
) -> None:
    """One warning naming, per over-long prompt, how many tokens were dropped and their text."""
    full = tokenizer(prompts, truncation=False, verbose=False).input_ids  # with BOS/EOS
    details = []
    for k, ids in enumerate(full):
        if len(ids) > MAX_LENGTH:
            lost = ids[MAX_LENGTH - 1 : -1]  # what fell between the kept tokens and EOS
            text = tokenizer.decode(lost, clean_up_tokenization_spaces=False)
            name = f"image {indices[k]}" if indices is not None else f"prompt {k}"
            details.append(f"{name}: {len(lost)} tokens dropped: {text!r}")
    if details:
        logger.warning(
            "Prompt truncated: CLIP can only handle sequences up to %d tokens (%s)",
            MAX_LENGTH,
            "; ".join(details),
        )


def encode_prompts(
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    text_encoders: tuple[CLIPTextModel, CLIPTextModel],
    prompts: Sequence[str],
    skip: int = 1,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: (prompt_embeds (B, 77, D1+D2), pooled (B, P2)).

    Equals diffusers' `StableDiffusionXLPipeline.encode_prompt` (skip=1 is its clip_skip=None):
    the two encoders' penultimate hidden states side by side, and bigG's projected pooled output.
    `indices` name the prompts' images in the truncation warning.
    """
    hidden = []
    with torch.no_grad():  # not inference_mode: cached embeddings may feed autograd later
        for k, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders, strict=True)):
            device = next(encoder.parameters()).device
            ids = tokenize(tokenizer, prompts, k == 0, indices).to(device)  # same text, warn once
            h, pooled = encoder(ids, skip=skip)  # (B, 77, Dk), (B, Pk)
            hidden.append(h)
    dtype = pooled.dtype
    prompt_embeds = torch.cat([h.to(device=device, dtype=dtype) for h in hidden], dim=-1)
    return prompt_embeds, pooled  # (B, 77, D1+D2), (B, P2)
