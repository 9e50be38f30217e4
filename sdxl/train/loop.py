"""The LoRA training loop: caches in, LoRA files out; resumable at any checkpoint, exact."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sdxl import lora_formats
from sdxl.data.cache import CachedDataset
from sdxl.lora import LoRAConfig, inject_lora, lora_parameters, lora_state_dict
from sdxl.schedulers import NoiseSchedule
from sdxl.train import distributed
from sdxl.train.caches import prepare_caches
from sdxl.train.checkpoint import (
    FINAL,
    Position,
    latest_checkpoint,
    load_checkpoint,
    position_dict,
    restore_rng,
    rng_state,
    save_checkpoint,
    step_checkpoint_path,
)
from sdxl.train.config import TrainConfig
from sdxl.train.data_order import epoch_batches, rank_slice, step_generator
from sdxl.train.ema import LoRAEMA
from sdxl.train.loss import draw_step_noise, per_sample_loss
from sdxl.train.metrics import MetricsLog
from sdxl.train.optim import lr_at, make_optimizer, set_lr
from sdxl.utils import atomic_write_text, to_dtype

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by the `stop_after` test hook to simulate a killed job after a checkpoint."""


class Trainer:
    """Holds the state of one run; `run()` trains to the end (or resumes and finishes)."""

    def __init__(self, cfg: TrainConfig, stop_after: int | None = None):
        self.cfg, self.stop_after = cfg, stop_after
        self.dist = distributed.setup(cfg.device)
        self.out = Path(cfg.output_dir)
        self.dtype = to_dtype(cfg.precision)
        if self.dist.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self.model_dir, latent_dir, text_dir = prepare_caches(cfg, self.dist)
        self.data = CachedDataset(latent_dir, text_dir)
        self.samples, self.partner = training_samples(self.data, cfg.random_flip)
        self._build_model()
        self.position = Position()
        self.batches_cache: tuple[int, list[list[int]]] | None = None
        self._resume()

    def _build_model(self) -> None:
        from sdxl.weights import load_component

        cfg, device = self.cfg, self.dist.device
        self.unet = load_component(self.model_dir, "unet", dtype=self.dtype, device=device)
        self.unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
        lora_cfg = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              target=cfg.lora_target, conv=cfg.lora_conv)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # same LoRA init on every rank and every run
            inject_lora(self.unet, lora_cfg)
        self.unet.train()
        self.params = lora_parameters(self.unet)
        self.optimizer = make_optimizer(self.params, cfg)
        self.ema = LoRAEMA(self.params, cfg.ema_decay) if cfg.use_ema else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        sched_cfg = json.loads((self.model_dir / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler_config = sched_cfg
        self.schedule = NoiseSchedule.from_config(sched_cfg).to(device)
        if self.dist.is_main:
            n = sum(p.numel() for p in self.params)
            log.info("LoRA: %s trainable parameters (%s)", f"{n:,}", cfg.lora_target)

    # ------------------------------------------------------------------ data order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.batches_cache is None or self.batches_cache[0] != epoch:
            keep = set(self.samples)
            buckets = {b: [i for i in idx if i in keep] for b, idx in self.data.buckets().items()}
            batches = epoch_batches(buckets, epoch, self.cfg.seed, self.cfg.batch_size,
                                    min_batch=self.dist.world)  # fmt: skip
            self.batches_cache = (epoch, batches)
        return self.batches_cache[1]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.epoch_batches(0)) / self.cfg.gradient_accumulation_steps)

    def total_steps(self) -> int:
        full = self.steps_per_epoch() * self.cfg.num_epochs
        return min(full, self.cfg.max_steps) if self.cfg.max_steps else full

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "lora": lora_state_dict(self.unet),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(),
            "position": position_dict(self.position),
            "config": self.cfg.to_dict(),
        }

    def _resume(self) -> None:
        source = self.cfg.resume_from
        if source in (None, "none", ""):
            return
        path = latest_checkpoint(self.out) if source == "auto" else Path(source)
        if path is None:
            return
        if not path.is_file():
            raise FileNotFoundError(f"--resume_from {path}: no such checkpoint")
        state = load_checkpoint(path)
        check_resumable(state.get("config", {}), self.cfg, path)
        from sdxl.lora import load_lora_state_dict

        load_lora_state_dict(self.unet, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        self.position = Position(**state["position"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.position.step)

    def save(self, path: Path) -> None:
        if self.dist.is_main:
            save_checkpoint(path, self.state())
        distributed.barrier()

    # ------------------------------------------------------------------ one optimizer step

    def collate(self, indices: list[int], rnd) -> dict:
        """Stack cached samples (choosing flipped variants by the step's draw) on the device."""
        items = [self.data[self.partner[i] if flip else i]
                 for i, flip in zip(indices, rnd.flip.tolist(), strict=True)]  # fmt: skip
        empty_embeds, empty_pooled = self.data.empty_text()
        batch = {k: torch.stack([it[k] for it in items])
                 for k in ("mean", "std", "prompt_embeds", "pooled", "time_ids")}  # fmt: skip
        batch["empty_embeds"] = empty_embeds.expand_as(batch["prompt_embeds"])
        batch["empty_pooled"] = empty_pooled.expand_as(batch["pooled"])
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        batch["keys"] = [it["key"] for it in items]
        return batch

    def optimizer_step(self, group: list[tuple[int, list[int]]], epoch: int) -> dict:
        """Accumulate over the micro-batches in `group`, then one clipped optimizer update."""
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(self.position.step + 1, cfg, self.total_steps()))
        losses, keys = [], []
        for batch_index, global_batch in group:
            first = self.data[global_batch[0]]
            rnd = draw_step_noise(step_generator(cfg.seed, epoch, batch_index), len(global_batch),
                                  tuple(first["mean"].shape), cfg)  # fmt: skip
            mine = rank_slice(len(global_batch), self.dist.rank, self.dist.world)
            batch = self.collate(global_batch[mine], rnd.take(mine))
            per_sample = per_sample_loss(
                self.unet, batch, rnd.take(mine), self.schedule, cfg, self.dtype
            )
            loss = per_sample.sum() / (len(global_batch) * len(group))
            self.scaler.scale(loss).backward()
            losses.append(per_sample.detach())
            keys += batch["keys"]
        distributed.all_reduce_grads(self.params)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        per_sample = torch.cat(losses)
        skipped = not bool(torch.isfinite(grad_norm))  # one host sync per optimizer step
        if skipped and self.dtype != torch.float16:
            bad = [
                k for k, v in zip(keys, per_sample.tolist(), strict=True) if not math.isfinite(v)
            ]
            log.warning("step %d: non-finite gradients, update skipped; samples with non-finite "
                        "loss: %s", self.position.step + 1, bad or "none (overflow in backward)")  # fmt: skip
        else:
            self.scaler.step(self.optimizer)  # skips by itself on fp16 overflow
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema and not skipped:
            self.ema.update()
        return {"loss": distributed.global_mean(per_sample), "grad_norm": grad_norm, "skipped": skipped,
                "images": sum(len(b) for _, b in group)}  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        cfg, total = self.cfg, self.total_steps()
        metrics = validator = None
        if self.dist.is_main:
            metrics = MetricsLog(self.out / "metrics.csv", self.position.step, cfg.wandb_project,
                                 cfg.wandb_run_name, cfg.to_dict())  # fmt: skip
            validator = self._validator()
        bar = tqdm(total=total, initial=self.position.step, desc="train", unit="step",
                   disable=not self.dist.is_main)  # fmt: skip
        window, t0 = [], time.perf_counter()
        while self.position.step < total and self.position.epoch < cfg.num_epochs:
            epoch = self.position.epoch
            batches = list(enumerate(self.epoch_batches(epoch)))
            accum = cfg.gradient_accumulation_steps
            groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
            for group in groups[self.position.step_in_epoch :]:
                out = self.optimizer_step(group, epoch)
                self.position.step += 1
                self.position.step_in_epoch += 1
                window.append(out)
                bar.update(1)
                step = self.position.step
                if metrics and (step % cfg.log_interval == 0 or step == total):
                    t0 = self._log(metrics, window, epoch, time.perf_counter() - t0, bar)
                    window = []
                if validator and cfg.validation_interval and step % cfg.validation_interval == 0:
                    metrics.log_images(step, validator.run(self.unet, step, self.out))
                if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0:
                    self.save(step_checkpoint_path(self.out, step))
                if self.stop_after is not None and step >= self.stop_after:
                    raise StopTraining(f"stopped after step {step}")
                if step >= total:
                    break
            if self.position.step_in_epoch >= len(groups):
                self.position.epoch += 1
                self.position.step_in_epoch = 0
                if self.position.epoch % cfg.save_interval == 0:
                    self.save(step_checkpoint_path(self.out, self.position.step))
        bar.close()
        self._finish(metrics)
        return self.out

    def _validator(self):
        cfg = self.cfg
        if not (cfg.validation_interval and cfg.validation_prompts):
            return None
        from sdxl.train.validation import Validator

        prompts = list(cfg.validation_prompts)[: cfg.num_validation_images]
        return Validator(self.model_dir, prompts, cfg.image_size, cfg.validation_guidance_scale,
                         cfg.validation_steps, cfg.seed, self.scheduler_config)  # fmt: skip

    def _log(
        self, metrics: MetricsLog, window: list[dict], epoch: int, seconds: float, bar
    ) -> float:
        loss = torch.stack([w["loss"] for w in window]).mean().item()
        row = {
            "step": self.position.step,
            "epoch": epoch,
            "loss": round(loss, 6),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": round(float(window[-1]["grad_norm"]), 6),
            "images_per_s": round(sum(w["images"] for w in window) * self.dist.world / max(seconds, 1e-9), 3),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if self.dist.device.type == "cuda" else "",
            "skipped": sum(w["skipped"] for w in window),
        }  # fmt: skip
        metrics.log(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
        return time.perf_counter()

    def _finish(self, metrics: MetricsLog | None) -> None:
        """Write lora_final.{pt,safetensors} (EMA weights when EMA is on) and checkpoint_final.pt."""
        self.save(self.out / FINAL)
        if self.dist.is_main:
            if self.ema:
                self.ema.swap()
            state = lora_state_dict(self.unet)
            layout = lora_formats.UNetLayout.from_module_names(
                [n for n, _ in self.unet.named_modules()]
            )
            meta = {"ss_training_steps": str(self.position.step), "ss_seed": str(self.cfg.seed)}
            lora_formats.save_seed_pt(self.out / "lora_final.pt", state, step=self.position.step)
            lora_formats.save_kohya(self.out / "lora_final.safetensors", state, meta, layout=layout)
            if self.ema:
                self.ema.swap()
            metrics.close()
        distributed.barrier()


# Settings that may change between a run and its resumption without changing what is learned.
RESUME_SAFE = {"output_dir", "resume_from", "device", "log_interval", "wandb_project", "wandb_run_name",
               "validation_prompts", "validation_interval", "num_validation_images",
               "validation_guidance_scale", "validation_steps", "checkpoint_steps", "save_interval",
               "num_epochs", "max_steps", "data_dir", "cache_batch_size"}  # fmt: skip


def check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to continue a checkpoint made with other training settings."""
    saved, current = (json.loads(json.dumps(c)) for c in (saved, cfg.to_dict()))  # tuples -> lists
    changed = sorted(k for k in current if k not in RESUME_SAFE and saved.get(k) != current[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"{path} was made with other settings ({diff}); use another --output_dir, or "
            "--resume_from none to start over in this one"
        )


def training_samples(data: CachedDataset, random_flip: bool) -> tuple[list[int], dict[int, int]]:
    """Unflipped samples to iterate over, and each one's flipped variant when flips are cached."""
    samples = [i for i in range(len(data)) if not data.is_flipped(i)]
    partner = {i: i for i in samples}
    if random_flip:
        flipped = {data.source(i): i for i in range(len(data)) if data.is_flipped(i)}
        if not flipped:
            log.warning("random_flip is on but the latent cache has no flipped variants; "
                        "rebuild it with flip enabled to train with flips")  # fmt: skip
        partner = {i: flipped.get(data.source(i), i) for i in samples}
    return samples, partner


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Train a LoRA as `cfg` says; returns the output folder."""
    try:
        return Trainer(cfg, stop_after).run()
    finally:
        distributed.teardown()
