"""Captions encoded inside the training step instead of read from the text cache.

Needed when what a caption encodes to changes during training: a LoRA on the text encoders
(--train_text_encoder), or kohya's caption shuffling (--shuffle_caption, --keep_tokens), where
the same image is seen with its ","-separated pieces in another order each time. Otherwise the
cached embeddings are exact and faster (caption dropout included: the cache holds "" too).

The read-ahead thread turns each row's (possibly shuffled) caption into token ids of both
tokenizers; the step drops captions on the device by swapping in the ids of "" (no host sync)
and runs both encoders, with gradients into their LoRA when it is trained. Shuffles are drawn
from (seed, epoch, batch, row), so a resumed run sees the captions a straight run sees.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch

from sdxl.text import load_tokenizers, tokenize
from sdxl.text_lora import (
    TEXT_ENCODERS,
    inject_text_lora,
    load_text_lora_state,
    text_lora_config,
    text_lora_state,
)
from sdxl.train.config import TrainConfig
from sdxl.train.data_order import rank_rows

log = logging.getLogger(__name__)

ID_KEYS = ("input_ids", "input_ids_2")  # host-row keys of the two tokenizers' ids (B, 77)


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random | int | str) -> str:
    """kohya's shuffle_caption: split on ",", keep the first `keep_tokens` pieces in front,
    shuffle the rest, join with ", " (pieces stripped, as kohya does)."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    pieces = [p.strip() for p in caption.strip().split(",")]
    fixed, flex = pieces[:keep_tokens], pieces[keep_tokens:]
    rng.shuffle(flex)
    return ", ".join(fixed + flex)


def caption_seed(seed: int, epoch: int, batch_index: int, row: int) -> str:
    """The shuffle seed of one row of one global batch (a string: random.Random hashes it)."""
    return f"caption:{seed}:{epoch}:{batch_index}:{row}"


def on_the_fly_reasons(cfg: TrainConfig) -> list[str]:
    """The settings that need the text encoders in the step (empty: use the text cache)."""
    reasons = ["--train_text_encoder"] if cfg.train_text_encoder else []
    shuffled = [k for k, plan in enumerate(cfg.subset_plans) if plan.shuffle_caption]  # inherit
    if shuffled:
        reasons.append(f"shuffle_caption of data subset(s) {shuffled}" if cfg.subsets
                       else "--shuffle_caption")  # fmt: skip
    return reasons


class StepText:
    """Both tokenizers and text encoders on the training device, frozen in the compute dtype,
    with a LoRA (fp32) when the text encoders are trained."""

    def __init__(self, model_dir: Path, cfg: TrainConfig, device: torch.device,
                 dtype: torch.dtype,
                 options: Callable[[int], tuple[bool, int]] | None = None):  # fmt: skip
        from sdxl.models.clip import CLIPTextModel
        from sdxl.weights import load_component

        self.cfg, self.device = cfg, device
        self.trained = cfg.train_text_encoder
        self.tokenizers = load_tokenizers(model_dir)
        self.encoders = [load_component(model_dir, n, model_cls=CLIPTextModel, dtype=dtype,
                                        device=device) for n in TEXT_ENCODERS]  # fmt: skip
        for encoder in self.encoders:
            encoder.requires_grad_(False)
            encoder.eval()
        if self.trained:
            lora = text_lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            inject_text_lora(self.encoders, lora, cfg.seed)
            for encoder in self.encoders:
                encoder.train()  # only LoRA dropout differs: CLIP has no dropout of its own
        self.empty_host = [tokenize(t, [""], warn=False) for t in self.tokenizers]  # (1, 77)
        self.empty_ids = [ids.to(device) for ids in self.empty_host]
        self._options = options

    # ------------------------------------------------------------------ host side

    def caption_options(self, sample_index: int) -> tuple[bool, int]:
        """(shuffle, keep_tokens) for one sample: the run's settings unless `options` says."""
        if self._options is not None:
            return self._options(sample_index)
        return self.cfg.shuffle_caption, self.cfg.keep_tokens

    def caption(self, sample_index: int, caption: str, seed: str) -> str:
        """The caption a row trains on this time (shuffled as `caption_options` says)."""
        shuffle, keep = self.caption_options(sample_index)
        return shuffle_caption(caption, keep, seed) if shuffle else caption

    def token_ids(self, captions: list[str], rows: int) -> dict[str, torch.Tensor]:
        """Both tokenizers' ids (rows, 77) of `captions`, padded with the ids of ""."""
        out = {}
        for key, tokenizer, empty in zip(ID_KEYS, self.tokenizers, self.empty_host, strict=True):
            ids = empty.repeat(rows, 1)  # (rows, 77)
            if captions:
                ids[: len(captions)] = tokenize(tokenizer, captions, warn=False)
            out[key] = ids
        return out

    def rows(self, data, global_batch: list[int], rank: int, per_rank: int, epoch: int,
             batch_index: int, pin: bool) -> dict[str, torch.Tensor]:  # fmt: skip
        """This rank's token ids of one global batch (the rows `read_rows` reads)."""
        mine = rank_rows(rank, per_rank)
        captions = [
            self.caption(i, data.samples[i]["caption"], caption_seed(self.cfg.seed, epoch,
                                                                    batch_index, row))
            for row, i in enumerate(global_batch[mine], start=mine.start or 0)
        ]  # fmt: skip
        out = self.token_ids(captions, per_rank)
        return {k: v.pin_memory() for k, v in out.items()} if pin else out

    # ------------------------------------------------------------------ in the step

    def encode(self, ids: tuple[torch.Tensor, torch.Tensor],
               drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(prompt_embeds (B, 77, D1+D2), pooled (B, P2)) with the dropped rows as "".

        With gradients into the LoRA when the encoders are trained, else without a graph.
        """
        hidden = []
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            for k, (encoder, empty) in enumerate(zip(self.encoders, self.empty_ids, strict=True)):
                tokens = torch.where(drop.view(-1, 1), empty, ids[k])  # (B, 77)
                h, pooled = encoder(tokens, skip=1)  # (B, 77, Dk), (B, Pk)
                hidden.append(h)
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch entries `per_sample_loss` reads, from a staged micro-batch `x`.

        The dropped rows are already "" here, so the loss's own swap to the empty caption is
        made a no-op (empty = the same embeddings).
        """
        embeds, pooled = self.encode(tuple(x[k] for k in ID_KEYS), x["drop_caption"])
        return {"prompt_embeds": embeds, "pooled": pooled, "empty_embeds": embeds,
                "empty_pooled": pooled}  # fmt: skip

    # ------------------------------------------------------------------ LoRA

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        from sdxl.lora import lora_parameters

        return [p for e in self.encoders for p in lora_parameters(e)] if self.trained else []

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Prefixed text-encoder LoRA state (empty when the encoders are not trained)."""
        return text_lora_state(self.encoders) if self.trained else {}

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.trained:
            load_text_lora_state(self.encoders, state)

    def refresh_validator(self, validator) -> None:
        """Re-encode a Validator's prompts with the encoders as they are now (LoRA, eval mode)."""
        was = [e.training for e in self.encoders]
        for e in self.encoders:
            e.eval()
        try:
            validator.encode(self.tokenizers, self.encoders)
        finally:
            for e, mode in zip(self.encoders, was, strict=True):
                e.train(mode)


def log_on_the_fly(cfg: TrainConfig) -> None:
    """The one line saying that text is encoded in the step, and why."""
    reasons = on_the_fly_reasons(cfg)
    log.info("text is encoded on the fly in every step (not read from the text cache) because "
             "of %s; the text encoders stay on the device", " and ".join(reasons))  # fmt: skip
