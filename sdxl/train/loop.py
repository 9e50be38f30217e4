"""The LoRA training loop: caches in, LoRA files out; resumable at any checkpoint, exact."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from pathlib import Path

import torch

from sdxl.data.cached_dataset import CachedDataset
from sdxl.dataset_config import SubsetPlan
from sdxl.errors import UserError
from sdxl.lora import LoRAConfig, inject_lora, lora_parameters, lora_state_dict
from sdxl.noise_schedule import NoiseSchedule, read_scheduler_config
from sdxl.progress import Progress
from sdxl.train import distributed
from sdxl.train.batches import read_ahead, read_rows
from sdxl.train.caches import (
    Caches,
    changed_settings,
    plan_caches,
    prepare_caches,
    resolve_model_dir,
)
from sdxl.train.checkpoint import (
    FINAL,
    Position,
    keep_newest_checkpoints,
    load_checkpoint,
    load_newest_checkpoint,
    position_dict,
    remove_checkpoints,
    restore_rng,
    retire_final,
    rng_state,
    save_checkpoint,
    step_checkpoint_path,
)
from sdxl.train.config import RESUME_SAFE, TrainConfig, for_model
from sdxl.train.data_order import epoch_batches, epoch_visits, step_generator
from sdxl.train.ema import LoRAEMA
from sdxl.train.export import RunFacts, optimizer_name, write_kohya_file, write_lora_files
from sdxl.train.hooks import pause_point
from sdxl.train.launch import output_lock
from sdxl.train.loss import draw_step_noise, per_sample_loss
from sdxl.train.metrics import MetricsLog
from sdxl.train.optim import lr_at, make_optimizer, param_groups, set_group_lrs
from sdxl.train.snapshots import (
    list_snapshots,
    optimizer_steps_per_epoch,
    prune_snapshots,
    snapshot_path,
    wanted_steps,
)
from sdxl.train.step import TrainStep, train_step
from sdxl.train.text_encoding import StepText, log_on_the_fly, on_the_fly_reasons
from sdxl.utils import atomic_write_text, to_dtype

log = logging.getLogger(__name__)


class Trainer:
    """Holds the state of one run; `run()` trains to the end (or resumes and finishes)."""

    def __init__(self, cfg: TrainConfig, caches: Caches, dist: distributed.DistInfo):
        self.cfg, self.caches, self.dist = cfg, caches, dist
        self.out = Path(cfg.output_dir)
        self.dtype = to_dtype(cfg.precision)
        self.model_dir = caches.model_dir
        self.data = CachedDataset(caches.latent_dir, caches.text_dir, caches.expect)
        self.plans = checked_subset_plans(cfg, self.data)
        self.samples, self.partner = training_samples(self.data, self.plans)
        self.visits = epoch_visits(*self._repeats())
        self.loss_scale = {i: cfg.prior_loss_weight for i in self.samples
                           if self.plans[self.data.subset(i)].is_reg}  # fmt: skip
        rates = {i: self.plans[self.data.subset(i)].caption_dropout_rate for i in self.samples}
        # None: every row drops at cfg.caption_dropout (the scalar draw); else per-row rates,
        # also when all subsets share one rate of their own.
        self.drop_rates = None if set(rates.values()) <= {cfg.caption_dropout} else rates
        self.batches_cache: tuple[int, list[list[int]]] | None = None
        if self.total_steps() == 0:
            raise UserError(
                f"{caches.latent_dir}: no training samples, so no optimizer step would run; "
                "rebuild the cache from a folder with usable image+caption pairs"
            )
        if self.dist.is_main:
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self._build_model()
        self.position = Position()
        self._resume()
        self.step = self._make_step()

    def _build_model(self) -> None:
        from sdxl.models.unet import UNet2DConditionModel
        from sdxl.weights import load_component

        cfg, device = self.cfg, self.dist.device
        self.unet = load_component(self.model_dir, "unet", model_cls=UNet2DConditionModel,
                                   dtype=self.dtype, device=device)  # fmt: skip
        if cfg.fused_qkv:
            self.unet.fuse_qkv()  # before the LoRA goes in: it stacks on the fused weight
        self.unet.set_gradient_checkpointing(
            cfg.checkpointing_mode if cfg.gradient_checkpointing else "none"
        )
        lora_cfg = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              target=cfg.lora_target, conv=cfg.lora_conv,
                              dora=cfg.lora_type == "dora")  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # same LoRA init on every rank and every run
            inject_lora(self.unet, lora_cfg)
        self.unet.train()
        self.text = self._step_text()
        unet_params = lora_parameters(self.unet)
        text_params = self.text.lora_parameters() if self.text else []
        self.params = unet_params + text_params
        self.optimizer = make_optimizer(param_groups(unet_params, text_params, cfg), cfg)
        self.ema = LoRAEMA(self.params, cfg.ema_decay) if cfg.use_ema else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.scheduler_config = read_scheduler_config(self.model_dir)[0]
        self.schedule = NoiseSchedule.from_config(self.scheduler_config).to(device)
        if self.dist.is_main:
            n = sum(p.numel() for p in self.params)
            log.info("LoRA: %s trainable parameters (%s)", f"{n:,}", cfg.lora_target)

    def _step_text(self) -> StepText | None:
        """Tokenizers and text encoders on the device, when captions are encoded in the step."""
        if not on_the_fly_reasons(self.cfg):
            return None  # the text cache: exact and faster
        if self.dist.is_main:
            log_on_the_fly(self.cfg)
        return StepText(self.model_dir, self.cfg, self.dist.device, self.dtype,
                        options=self._caption_options)  # fmt: skip

    def _caption_options(self, sample: int) -> tuple[bool, int]:
        """(shuffle_caption, keep_tokens) of the sample's data subset."""
        plan = self.plans[self.data.subset(sample)]
        return plan.shuffle_caption, plan.keep_tokens

    # ------------------------------------------------------------------ data order

    def _repeats(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(sample, num_repeats) of the training samples, and of the regularization ones."""
        pairs = [(i, self.plans[self.data.subset(i)]) for i in self.samples]
        return ([(i, p.num_repeats) for i, p in pairs if not p.is_reg],
                [(i, p.num_repeats) for i, p in pairs if p.is_reg])  # fmt: skip

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """One epoch's global batches: every visit (repeats, regularization) in a batch."""
        if self.batches_cache is None or self.batches_cache[0] != epoch:
            buckets: dict[tuple[int, int], list[int]] = {}
            for i in self.visits:
                buckets.setdefault(tuple(self.data.samples[i]["bucket"]), []).append(i)
            global_batch = self.cfg.batch_size * self.dist.world  # --batch_size is per GPU
            batches = epoch_batches(buckets, epoch, self.cfg.seed, global_batch)
            self.batches_cache = (epoch, batches)
        return self.batches_cache[1]

    def steps_per_epoch(self) -> int:
        batches, accumulation = len(self.epoch_batches(0)), self.cfg.gradient_accumulation_steps
        return optimizer_steps_per_epoch(batches, accumulation)

    def total_steps(self) -> int:
        full = self.steps_per_epoch() * self.cfg.num_epochs
        return min(full, self.cfg.max_steps) if self.cfg.max_steps else full

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "lora": lora_state_dict(self.unet),
            **({"text_lora": self.text.lora_state()} if self.text and self.text.trained else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(),
            "position": position_dict(self.position),
            "config": self.cfg.to_dict(),
            "data": self.caches.data_key,
            "plan": {"total_steps": self.total_steps()},  # a decaying schedule's shape
        }

    def _resume(self) -> None:
        """Continue from the checkpoint --resume_from names (auto: the newest one it can).

        'auto' continues from the newest readable checkpoint at or before this run's last step
        whose snapshots are all still there, so a longer run continues a shorter one, a shorter
        one reuses a checkpoint at its length, and both end equal to a straight run. It starts
        over (old checkpoints and snapshots removed) when the checkpoint was trained on other
        data, or for a decaying learning-rate schedule planned for another length. An explicit
        path is refused in those cases; other learning settings are always refused.
        """
        source = resume_source(self.cfg)
        explicit = source not in (None, "auto")
        if source is None:
            found = None
        else:
            found = (source, load_checkpoint(source)) if explicit else self._continuable()
        if found is None:
            self._start_over(None, "")
            return
        path, state = found
        if state.get("data") != self.caches.data_key:
            self._other_data(path, state.get("data"), explicit)
            return
        planned, total = state.get("plan", {}).get("total_steps"), self.total_steps()
        if self.cfg.schedule_depends_on_length and planned != total:
            why = (f"its {self.cfg.lr_scheduler} learning-rate schedule was planned for {planned} "
                   f"steps, this run has {total}, and the schedule's shape depends on the total")  # fmt: skip
            if explicit:
                raise UserError(f"--resume_from {path}: {why}; pass --resume_from none to start "
                                "over, or the --max_steps/--num_epochs it was made with")  # fmt: skip
            self._start_over(path, why)
            return
        check_resumable(
            state["config"], self.cfg, path, ignore=set(self.caches.data_key["settings"])
        )
        if state["position"]["step"] > total:  # only an explicit path gets here
            raise UserError(f"--resume_from {path} is at step {state['position']['step']}, past "
                            f"this run's {total} steps; pass an earlier checkpoint, or a larger "
                            "--max_steps/--num_epochs")  # fmt: skip
        from sdxl.lora import load_lora_state_dict

        load_lora_state_dict(self.unet, state["lora"])
        if self.text:
            self.text.load_lora_state(state.get("text_lora", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        self.position = Position(**state["position"])
        self._tidy_from(path, self.position.step)
        if self.dist.is_main:
            log.info("resuming from step %d (checkpoint %s)", self.position.step, path)

    def _continuable(self) -> tuple[Path, dict] | None:
        """The newest checkpoint at or before the last step whose snapshots are all on disk."""
        total, have = self.total_steps(), set(list_snapshots(self.out, self.cfg.output_name))

        def usable(path: Path, state: dict) -> bool:
            step = state["position"]["step"]
            if step > total:
                return False
            missing = sorted(set(self._wanted(step)) - have)
            if missing and self.dist.is_main:
                log.info("%s: the snapshots of steps %s are gone, so it cannot continue exactly; "
                         "trying an earlier checkpoint", path, missing)  # fmt: skip
            return not missing

        return load_newest_checkpoint(self.out, usable)

    def _tidy_from(self, path: Path, step: int) -> None:
        """Remove what a straight run would not have at `step`: later checkpoints and snapshots,
        and the final checkpoint unless resumed from (it is written again at the end). A run that
        continues past the final checkpoint keeps it as its step checkpoint."""
        distributed.barrier()  # every rank has read its checkpoint before rank 0 changes them
        if self.dist.is_main:
            final = self.out / FINAL
            resumed_final = final.is_file() and Path(path).resolve() == final.resolve()
            if resumed_final and step < self.total_steps():
                retire_final(self.out, step)
            elif not resumed_final:
                final.unlink(missing_ok=True)
            remove_checkpoints(self.out, after=step)
            prune_snapshots(self.out, self.cfg.output_name, set(self._wanted(step)))

    def _start_over(self, path: Path | None, why: str) -> None:
        """Train from step 0: no checkpoint or snapshot of an earlier run may survive."""
        distributed.barrier()
        if self.dist.is_main:
            if path is not None:
                log.warning("%s: %s; starting over, the old checkpoints and snapshots are "
                            "removed", path, why)  # fmt: skip
            remove_checkpoints(self.out)
            prune_snapshots(self.out, self.cfg.output_name, set())
            log.info("starting from step 0")

    def _other_data(self, path: Path, saved: dict | None, explicit: bool) -> None:
        """Start over (or refuse an explicit --resume_from) when `path` was trained on other data."""
        saved = saved if isinstance(saved, dict) else {}
        what = changed_settings(saved.get("settings", {}), self.caches.data_key["settings"])
        what = "; ".join(what) or "the dataset or model files changed"
        if explicit:
            raise UserError(
                f"--resume_from {path} was trained on other data ({what}); pass --resume_from "
                "none to start over, or the --data_dir and settings it was made with"
            )
        self._start_over(path, f"it was trained on other data ({what})")

    def save(self, path: Path) -> None:
        if self.dist.is_main:
            save_checkpoint(path, self.state())
            keep_newest_checkpoints(self.out, self.cfg.save_last_n)
        distributed.barrier()

    def _wanted(self, step: int) -> list[int]:
        """The snapshot steps a straight run has on disk after `step` steps."""
        return wanted_steps(self.cfg, step, self.steps_per_epoch())

    def save_snapshot(self, step: int) -> None:
        """<output_name>-stepNNNNNNNN.safetensors (EMA weights when EMA is on), newest N kept."""
        if self.dist.is_main:
            name = self.cfg.output_name
            with self._exported_weights():
                write_kohya_file(snapshot_path(self.out, name, step), self.unet, self.cfg,
                                 self.facts(), optimizer_name(self.optimizer),
                                 text=self._text_state())  # fmt: skip
            prune_snapshots(self.out, name, set(self._wanted(step)))

    @contextlib.contextmanager
    def _exported_weights(self):
        """The weights users get: the EMA ones when EMA is on (swapped in for the block)."""
        if self.ema:
            self.ema.swap()
        try:
            yield
        finally:
            if self.ema:
                self.ema.swap()

    def _text_state(self) -> dict | None:
        """The text encoders' LoRA (prefixed keys) for the files, when they are trained."""
        return self.text.lora_state() if self.text and self.text.trained else None

    def facts(self) -> RunFacts:
        return RunFacts(steps=self.position.step, max_steps=self.total_steps(),
                        epochs=self.position.epoch, num_images=len(self.samples),
                        batches_per_epoch=len(self.epoch_batches(0)), world=self.dist.world)  # fmt: skip

    # ------------------------------------------------------------------ one optimizer step

    def _make_step(self) -> TrainStep:
        """The step's preallocated state (built after a resume, which replaces optimizer state)."""
        empty = tuple(t.to(self.dist.device) for t in self.data.empty_text())
        return TrainStep(self.unet, self.params, self.optimizer, self.schedule, self.cfg,
                         self.dist, per_sample_loss, empty, scaler=self.scaler,
                         ema=self.ema, text=self.text)  # fmt: skip

    def read_group(self, group: list[tuple[int, list[int]]], epoch: int = 0) -> list[dict]:
        """This rank's padded rows of each micro-batch of `group` (runs in the read-ahead thread)."""
        pin = self.dist.device.type == "cuda"
        rows = [read_rows(self.data, self.partner, batch, self.dist.rank, self.cfg.batch_size,
                          len(group), pin, self.loss_scale) for _, batch in group]  # fmt: skip
        if self.drop_rates:  # each global row's caption dropout rate, for the device's draw
            size = self.cfg.batch_size * self.dist.world
            for r, (_, batch) in zip(rows, group, strict=True):
                rates = torch.zeros(size)
                rates[: len(batch)] = torch.tensor([self.drop_rates[i] for i in batch])
                r["drop_rate"] = rates.pin_memory() if pin else rates
        if self.text:  # the captions' token ids, shuffled per (seed, epoch, batch, row)
            for r, (index, batch) in zip(rows, group, strict=True):
                r.update(self.text.rows(self.data, batch, self.dist.rank, self.cfg.batch_size,
                                        epoch, index, pin))  # fmt: skip
        return rows

    def optimizer_step(self, group: list[tuple[int, list[int]]], host: list[dict],
                       epoch: int) -> dict:  # fmt: skip
        """Draw the group's noise on the device, stage its micro-batches, one `train_step`."""
        cfg, device = self.cfg, self.dist.device
        set_group_lrs(self.optimizer, self.position.step + 1, cfg, self.total_steps())
        micro, flips = [], []
        for slot, ((batch_index, _), rows) in enumerate(zip(group, host, strict=True)):
            g = step_generator(cfg.seed, epoch, batch_index, device)
            rates = rows.pop("drop_rate", None)
            rates = None if rates is None else rates.to(device, non_blocking=True)
            rnd = draw_step_noise(g, cfg.batch_size * self.dist.world,
                                  tuple(rows["mean"].shape[1:]), cfg, rates)  # fmt: skip
            micro.append(self.step.stage(rows, rnd, slot))
            flips.append(rnd.flip)
        pause_point(f"step-{self.position.step + 1}")
        out = train_step(self.step, micro)
        return {"out": out, "batches": [b for _, b in group], "flips": flips,
                "images": sum(len(b) for _, b in group)}  # fmt: skip

    def guarded_step(self, group: list[tuple[int, list[int]]], host: list[dict],
                     epoch: int) -> dict:  # fmt: skip
        """optimizer_step, with running out of GPU memory turned into what to change."""
        try:
            return self.optimizer_step(group, host, epoch)
        except torch.OutOfMemoryError as err:
            width, height = self.data.samples[group[0][1][0]]["bucket"]
            raise UserError(
                f"out of GPU memory in step {self.position.step + 1} at bucket {width}x{height} "
                f"with --batch_size {self.cfg.batch_size} per GPU; use --gradient_checkpointing, "
                "a smaller --batch_size, or a smaller --image_size"
            ) from err

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        """Train from the resumed position to the end, then write the LoRA files."""
        cfg = self.cfg
        metrics = validator = None
        start = self.position.step
        if self.dist.is_main:
            metrics = MetricsLog(self.out / "metrics.csv", self.position.step, cfg.trackers,
                                 cfg.to_dict(), wandb_project=cfg.wandb_project,
                                 run_name=cfg.wandb_run_name,
                                 logging_dir=Path(cfg.logging_dir) if cfg.logging_dir else None)  # fmt: skip
            validator = self._validator()
            if start == 0:  # the base model (the LoRA starts at zero); kept if drawn already
                self._sample(metrics, validator, 0, keep=True)
        # A with-block closes the bar on errors too, so an error message starts its own line.
        with Progress(self.total_steps(), "train", "step", initial=self.position.step,
                      disable=not self.dist.is_main) as bar:  # fmt: skip
            self._epochs(metrics, validator, bar)
        # The end, always; a resumed run with no step left keeps the grid it drew.
        self._sample(metrics, validator, self.position.step, keep=self.position.step == start)
        self._finish(metrics)
        return self.out

    def _epochs(self, metrics: MetricsLog | None, validator, bar) -> None:
        """The epoch and step loop: log, validate, checkpoint as configured."""
        cfg, total = self.cfg, self.total_steps()
        window, t0 = [], time.perf_counter()
        while self.position.step < total and self.position.epoch < cfg.num_epochs:
            epoch = self.position.epoch
            batches = list(enumerate(self.epoch_batches(epoch)))
            accum = cfg.gradient_accumulation_steps
            groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
            todo = groups[self.position.step_in_epoch :]
            read = functools.partial(self.read_group, epoch=epoch)
            for group, host in zip(todo, read_ahead(read, todo), strict=True):
                out = self.guarded_step(group, host, epoch)
                self.position.step += 1
                self.position.step_in_epoch += 1
                window.append(out)
                step = self.position.step
                if step % cfg.log_interval == 0 or step == total:  # the only host syncs
                    if metrics:
                        t0 = self._log(metrics, window, epoch, time.perf_counter() - t0, bar)
                    window = []
                bar.update(1)  # after the log: a progress line shows this step's loss
                if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                    self.save_snapshot(step)
                if cfg.sample_interval and step % cfg.sample_interval == 0:
                    self._sample(metrics, validator, step)
                if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0:
                    self.save(step_checkpoint_path(self.out, step))
                if step >= total:
                    break
            if self.position.step_in_epoch >= len(groups):
                self.position.epoch += 1
                every, step = cfg.save_every_n_epochs, self.position.step
                by_steps = cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0
                if every and self.position.epoch % every == 0 and not by_steps:
                    self.save_snapshot(step)  # (a step snapshot of this step is the same file)
                every = cfg.sample_every_n_epochs
                if every and self.position.epoch % every == 0:
                    self._sample(metrics, validator, self.position.step)
                self.position.step_in_epoch = 0
                if self.position.epoch % cfg.save_interval == 0:
                    self.save(step_checkpoint_path(self.out, self.position.step))

    def _validator(self):
        """Sample grids whenever prompts are given: at step 0, as configured, and at the end."""
        if not self.cfg.validation_prompts:
            return None
        from sdxl.train.validation import Validator

        return Validator(self.model_dir, self.cfg.samples, self.scheduler_config)

    def _sample(self, metrics: MetricsLog | None, validator, step: int, keep: bool = False) -> None:
        """Draw the grid of `step` (unless already drawn; `keep`: or there) and log it."""
        if validator and self._text_state() is not None:  # the prompts through today's TE LoRA
            self.text.refresh_validator(validator)
        path = validator.run(self.unet, step, self.out, keep=keep) if validator else None
        if path is not None:
            metrics.log_images(step, path)

    def _log(
        self, metrics: MetricsLog, window: list[dict], epoch: int, seconds: float, bar
    ) -> float:
        """One metrics row for the steps in `window`: their results are read back here."""
        losses = [self._step_loss(w) for w in window]
        skipped = [bool(w["out"].skipped) for w in window]
        if self.dtype != torch.float16:  # fp16 overflow skips are the loss scaler's normal work
            for k, w in enumerate(window):
                if skipped[k]:
                    self._warn_non_finite(w, self.position.step - len(window) + k + 1)
        loss = sum(losses) / len(losses)
        row = {
            "step": self.position.step,
            "epoch": epoch,
            "loss": round(loss, 6),
            "lr": lr_at(self.position.step, self.cfg, self.total_steps(), self.cfg.unet_lr),
            "grad_norm": round(float(window[-1]["out"].grad_norm), 6),
            "images_per_s": round(sum(w["images"] for w in window) / max(seconds, 1e-9), 3),  # global
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if self.dist.device.type == "cuda" else "",
            "skipped": sum(skipped),
        }  # fmt: skip
        metrics.log(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
        return time.perf_counter()

    @staticmethod
    def _step_loss(w: dict) -> float:
        """Mean loss over the real samples of one step (padding rows excluded)."""
        rows = w["out"].losses.tolist()
        real = [v for batch, r in zip(w["batches"], rows, strict=True) for v in r[: len(batch)]]
        return sum(real) / len(real)

    def _warn_non_finite(self, w: dict, step: int) -> None:
        """Name the samples whose loss was not finite in a skipped step."""
        bad = []
        for batch, rows, flips in zip(
            w["batches"], w["out"].losses.tolist(), w["flips"], strict=True
        ):
            for i, value, flip in zip(batch, rows, flips.tolist(), strict=False):
                if not math.isfinite(value):
                    bad.append(self.data.samples[self.partner[i] if flip else i]["key"])
        log.warning("step %d: non-finite gradients, update skipped; samples with non-finite "
                    "loss: %s", step, bad or "none (overflow in backward)")  # fmt: skip

    def _finish(self, metrics: MetricsLog | None) -> None:
        """Write lora_final.{pt,safetensors} (EMA weights when EMA is on) and checkpoint_final.pt."""
        self.save(self.out / FINAL)
        if self.dist.is_main:
            with self._exported_weights():
                write_lora_files(self.out, self.unet, self.cfg, self.facts(),
                                 optimizer_name(self.optimizer), text=self._text_state())  # fmt: skip
            metrics.close()
        distributed.barrier()


def check_resumable(
    saved: dict, cfg: TrainConfig, path: Path, ignore: set[str] = frozenset()
) -> None:
    """Refuse to continue a checkpoint made with other training settings.

    `ignore`: settings already compared as part of the data key (a change there starts over).
    A setting the checkpoint does not record is newer than it: it was made with the default.
    """
    defaults = TrainConfig(data_dir="").to_dict()
    saved, current = (json.loads(json.dumps(c)) for c in ({**defaults, **saved}, cfg.to_dict()))
    safe = RESUME_SAFE | ignore
    changed = sorted(k for k in current if k not in safe and saved.get(k) != current[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise UserError(
            f"{path} was made with other settings ({diff}); use another --output_dir, or "
            "--resume_from none to start over in this one"
        )


def checked_subset_plans(cfg: TrainConfig, data: CachedDataset) -> list[SubsetPlan]:
    """The run's subset plans, checked against the subsets the cache's items come from."""
    plans = cfg.subset_plans
    used = {data.subset(i) for i in range(len(data))}
    if max(used, default=0) >= len(plans):
        raise UserError(
            f"{data.latent_dir.parent}: its items come from {max(used) + 1} data subsets but the "
            f"settings list {len(plans)}; pass the subsets the cache was built from, or rebuild it"
        )
    return plans


def training_samples(
    data: CachedDataset, plans: list[SubsetPlan]
) -> tuple[list[int], dict[int, int]]:
    """Unflipped samples to iterate over, and each one's flipped variant where its subset
    flips and flips are cached."""
    samples = [i for i in range(len(data)) if not data.is_flipped(i)]
    flipped = {data.source(i): i for i in range(len(data)) if data.is_flipped(i)}
    if any(plans[data.subset(i)].flip for i in samples) and not flipped:
        log.warning("random_flip (or flip_aug) is on but the latent cache has no flipped "
                    "variants; rebuild it with flip enabled to train with flips")  # fmt: skip
    partner = {i: flipped.get(data.source(i), i) if plans[data.subset(i)].flip else i
               for i in samples}  # fmt: skip
    return samples, partner


def resume_source(cfg: TrainConfig) -> Path | str | None:
    """'auto', the checkpoint path --resume_from names, or None; a missing path is refused."""
    source = cfg.resume_from
    if source in (None, "none", ""):
        return None
    if source == "auto":
        return "auto"
    if not Path(source).is_file():
        raise UserError(
            f"--resume_from {source}: no such checkpoint; pass a checkpoint-step*.pt or "
            "checkpoint_final.pt, 'auto' (the newest in --output_dir) or 'none'"
        )
    return Path(source)


def train(cfg: TrainConfig) -> Path:
    """Train a LoRA as `cfg` says; returns the output folder.

    Everything that can be checked without writing is checked first (model folder, settings
    against the model, --resume_from, the dataset), so bad input leaves output_dir untouched;
    then rank 0 holds the output folder's lock for the rest of the run.
    """
    dist = distributed.setup(cfg.device)
    try:
        if dist.device.type == "cpu" and cfg.precision == "fp16":
            raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        model_dir = resolve_model_dir(cfg.pretrained_model, cfg.config_source)
        cfg = for_model(cfg, *read_scheduler_config(model_dir))
        resume_source(cfg)
        build = plan_caches(cfg, model_dir, dist)
        with output_lock(cfg.output_dir, dist):
            caches = prepare_caches(cfg, model_dir, build, dist)
            return Trainer(cfg, caches, dist).run()
    finally:
        distributed.teardown()
