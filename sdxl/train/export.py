"""The LoRA files a run hands to users, with training metadata that is true for that run.

kohya's `ss_*` header fields are what ComfyUI/A1111 users (and their LoRA browsers) read to
see how a LoRA was trained; each value here comes from the run itself, not from a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.lora_formats.kohya import save_kohya
from sdxl.lora_formats.layout import UNetLayout
from sdxl.lora_formats.seed import save_seed_pt
from sdxl.train.config import TrainConfig


@dataclass(frozen=True)
class RunFacts:
    """What the run did, beyond its config."""

    steps: int  # optimizer steps done
    max_steps: int  # optimizer steps planned
    epochs: int  # epochs completed
    num_images: int  # training images (unflipped samples)
    batches_per_epoch: int  # global batches in one epoch
    world: int  # processes (GPUs)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """kohya's ss_optimizer style: the class path and its non-default settings."""
    cls = type(optimizer)
    group = optimizer.param_groups[0]
    shown = [f"{k}={tuple(group[k]) if k == 'betas' else group[k]}"
             for k in ("weight_decay", "betas") if k in group]  # fmt: skip
    return f"{cls.__module__}.{cls.__name__}({','.join(shown)})"


def training_metadata(cfg: TrainConfig, facts: RunFacts, optimizer_label: str) -> dict[str, str]:
    """The kohya ss_* training fields of this run (all strings, as safetensors headers need)."""
    size = cfg.image_size
    fields = {
        "ss_sd_model_name": Path(cfg.pretrained_model).name or cfg.pretrained_model,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.unet_lr or cfg.learning_rate,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.warmup_steps,
        "ss_optimizer": optimizer_label,
        "ss_max_train_steps": facts.max_steps,
        "ss_steps": facts.steps,
        "ss_epoch": facts.epochs,
        "ss_num_epochs": cfg.num_epochs,
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * facts.world * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_num_train_images": facts.num_images,
        "ss_resolution": f"({size}, {size})",
        "ss_seed": cfg.seed,
        "ss_mixed_precision": cfg.precision,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_flip_aug": cfg.random_flip,
        "ss_network_dropout": cfg.lora_dropout,
    }
    if cfg.train_text_encoder:
        fields["ss_text_encoder_lr"] = cfg.text_encoder_lr or cfg.learning_rate
    return {k: str(v) for k, v in fields.items()}


def write_kohya_file(path: Path, unet: torch.nn.Module, cfg: TrainConfig, facts: RunFacts,
                     optimizer_label: str, text: dict | None = None) -> None:  # fmt: skip
    """The UNet's LoRA as a kohya .safetensors with the run's metadata (final or snapshot);
    `text`: the text encoders' LoRA state (prefixed keys), written as lora_te1_/lora_te2_."""
    from sdxl.lora import lora_state_dict

    layout = UNetLayout.from_config(unet.config)
    state = {**lora_state_dict(unet), **(text or {})}
    save_kohya(path, state, training_metadata(cfg, facts, optimizer_label), layout=layout,
               resolution=cfg.image_size, prediction_type=cfg.prediction_type)  # fmt: skip


def write_lora_files(out: Path, unet: torch.nn.Module, cfg: TrainConfig, facts: RunFacts,
                     optimizer_label: str, text: dict | None = None) -> None:  # fmt: skip
    """lora_final.safetensors (kohya, with the run's metadata; the text encoders' LoRA too) and
    the seed's lora_final.pt (UNet only: the seed's format has no text encoders)."""
    from sdxl.lora import lora_state_dict

    save_seed_pt(out / "lora_final.pt", lora_state_dict(unet), step=facts.steps)
    write_kohya_file(out / "lora_final.safetensors", unet, cfg, facts, optimizer_label, text)
