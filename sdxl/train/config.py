"""Every setting of a training run, validated once and written as config.json beside the outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from sdxl.dataset_config import Subset, SubsetPlan, plan_subsets
from sdxl.errors import UserError
from sdxl.train.sample_prompts import SamplePrompt, sample_prompts

PRECISIONS = ("bf16", "fp16", "fp32")
LORA_TYPES = ("lora", "dora")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")
REPORT_TO = ("none", "tensorboard", "wandb", "all")  # diffusers' --report_to
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")
PREDICTIONS = ("epsilon", "v_prediction")
CHECKPOINTING_MODES = ("full", "selective")  # what gradient_checkpointing recomputes
COMPILE_MODES = ("full", "regional")


# How each setting relates to what a run learns. One place: the trainer's resume check and the
# workflow's rerun decisions both read these.
# Speed, logging and bookkeeping: a checkpoint made under other values resumes, and the workflow
# reruns nothing when they change. (compile and fused_qkv change float rounding, not the maths.)
RUNTIME_SETTINGS = ("compile", "compile_mode", "cuda_graphs", "checkpointing_mode",
                    "gradient_checkpointing", "fused_qkv", "log_interval", "report_to",
                    "logging_dir", "wandb_project", "wandb_run_name", "checkpoint_steps",
                    "save_interval", "device", "output_dir", "resume_from", "data_dir",
                    "cache_batch_size", "config_source")  # fmt: skip
# Validation grids: drawn during training by the CLI, by their own rule in the workflow.
VALIDATION_SETTINGS = ("validation_prompts", "validation_interval", "num_validation_images",
                       "validation_guidance_scale", "validation_steps", "sample_prompts",
                       "sample_every_n_steps", "sample_every_n_epochs")  # fmt: skip
# How long to train: a longer run continues a shorter one (unless the schedule decays).
LENGTH_SETTINGS = ("num_epochs", "max_steps")
# Which LoRA snapshots a run keeps: checked against the files when a run continues.
SNAPSHOT_SETTINGS = ("save_every_n_steps", "save_every_n_epochs", "save_last_n", "output_name")


@dataclass(frozen=True)
class TrainConfig:
    """Flag names and defaults follow the original project's train_sdxl.py."""

    data_dir: str
    output_dir: str = "./outputs"
    pretrained_model: str = "./weights/sdxl-base-1.0"  # folder, Hub repo id or single file
    config_source: str | None = None  # single files: where configs and tokenizers come from
    vae_model: str | None = None
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_mode: str = "attention"
    lora_targets: tuple[str, ...] = ()
    lora_conv: bool = False
    lora_type: str = "lora"  # "lora" or "dora" (weight-decomposed LoRA, LyCORIS dora_wd)
    # optimisation
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: int = 10
    max_steps: int | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: cosine decays from the base rate
    lr_scheduler_power: float = 1.0  # polynomial: (1 - progress) ** power (1: linear)
    warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False  # the original flag: the same as optimizer adamw8bit
    optimizer: str = "adamw"
    optimizer_args: tuple[str, ...] = ()  # kohya's key=value extras for the optimizer
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    # speed (sdxl/train/step.py); compile None = on for CUDA, off on the CPU. CUDA graphs are
    # opt-in (None = wherever the step can be captured) until a GPU run has verified them.
    compile: bool | None = None
    compile_mode: str = "full"
    cuda_graphs: bool | None = False
    checkpointing_mode: str = "full"  # with gradient_checkpointing: full or selective recompute
    fused_qkv: bool = False  # one GEMM for each attention's q/k/v (files keep the names)
    # objective
    prediction_type: str | None = None  # None: the model's (scheduler_config.json)
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    # text encoders (sdxl/train/text_encoding.py): with any of these on, captions are encoded
    # in each step instead of read from the text cache. kohya's names and semantics.
    train_text_encoder: bool = False  # LoRA on both CLIP encoders too (same rank and alpha)
    text_encoder_lr: float | None = None  # the text encoders' LoRA rate (None: learning_rate)
    unet_lr: float | None = None  # the UNet LoRA's rate (None: learning_rate)
    shuffle_caption: bool = False  # shuffle the ","-separated pieces of a caption each time
    keep_tokens: int = 0  # with shuffle_caption: the first N pieces stay in front
    timestep_min: int = 0
    timestep_max: int | None = None  # None: the schedule's num_train_timesteps
    # data
    # kohya's dataset subsets (sdxl/dataset_config.py: --dataset_config, the pipeline's
    # data.subsets); empty: data_dir is the one folder (or a pipeline cache of one).
    subsets: tuple[Subset, ...] = ()
    prior_loss_weight: float = 1.0  # kohya's: the loss weight of is_reg (regularization) items
    image_size: int = 1024
    center_crop: bool = False
    random_flip: bool = True
    min_image_size: int = 64
    strict_data: bool = False
    cache_batch_size: int = 4
    # checkpoints, snapshots and logging
    save_interval: int = 1
    checkpoint_steps: int = 0
    save_every_n_steps: int = 0  # a loadable <output_name>-stepNNNNNNNN.safetensors (0: off)
    save_every_n_epochs: int = 0  # kohya's: also one at the end of every Nth epoch (0: off)
    save_last_n: int = 0  # keep only the newest N snapshots and step checkpoints (0: all)
    output_name: str = "lora"  # the snapshots' file name prefix
    resume_from: str | None = "auto"
    log_interval: int = 10
    report_to: str = (
        "none"  # also where metrics go besides metrics.csv; wandb_project implies wandb
    )
    logging_dir: str | None = None  # TensorBoard's folder; None: output_dir/logs
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_interval: int = 0
    num_validation_images: int = 4
    validation_guidance_scale: float = 7.5
    validation_steps: int = 20
    # kohya's names (sdxl/train/sample_prompts.py): the --sample_prompts file the prompts were
    # read from (its lines are validation_prompts); sample_every_n_steps is validation_interval.
    sample_prompts: str | None = None
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0  # also a grid at the end of every Nth epoch (0: off)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        _choice("precision", self.precision, PRECISIONS)
        _choice("lora_type", self.lora_type, LORA_TYPES)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("report_to", self.report_to, REPORT_TO)
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(
                f"use_8bit_adam is AdamW8bit; it contradicts optimizer {self.optimizer!r}"
            )
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("checkpointing_mode", self.checkpointing_mode, CHECKPOINTING_MODES)
        if self.prediction_type is not None:
            _choice("prediction_type", self.prediction_type, PREDICTIONS)
        for key in ("batch_size", "gradient_accumulation_steps", "num_epochs", "lora_rank",
                    "image_size", "save_interval", "log_interval", "validation_steps"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.image_size % 64:
            raise ValueError(f"image_size must be a multiple of 64, got {self.image_size}")
        for key in ("save_every_n_steps", "save_every_n_epochs", "save_last_n", "checkpoint_steps",
                    "validation_interval",
                    "sample_every_n_steps", "sample_every_n_epochs"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 (off) or positive, got {getattr(self, key)}")
        if not self.output_name or "/" in self.output_name or self.output_name.startswith("."):
            raise ValueError(
                f"output_name must be a plain file name prefix, got {self.output_name!r}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or unset), got {self.max_steps}")
        top = self.timestep_max
        if self.timestep_min < 0 or (top is not None and self.timestep_min >= top):
            raise ValueError(
                f"timestep range [{self.timestep_min}, {top}) is empty or negative; "
                "pass 0 <= --timestep_min < --timestep_max"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError("min_snr_gamma must be positive (leave it unset to disable)")
        if self.lr_scheduler_num_cycles < 1:
            raise ValueError(
                f"lr_scheduler_num_cycles must be at least 1, got {self.lr_scheduler_num_cycles}"
            )
        if self.lr_scheduler_power <= 0:
            raise ValueError(f"lr_scheduler_power must be positive, got {self.lr_scheduler_power}")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for key in ("text_encoder_lr", "unet_lr"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive (or unset), got {getattr(self, key)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or positive, got {self.keep_tokens}")
        steps, interval = self.sample_every_n_steps, self.validation_interval
        if steps and interval and steps != interval:
            raise ValueError(f"sample_every_n_steps {steps} is kohya's name for "
                             f"validation_interval {interval}; set one of them")  # fmt: skip
        self.samples  # noqa: B018  (each prompt line's options are checked)

    @property
    def sample_interval(self) -> int:
        """Every how many steps a grid is drawn (0: off): validation_interval, or kohya's name."""
        return self.validation_interval or self.sample_every_n_steps

    @property
    def samples(self) -> list[SamplePrompt]:
        """The first num_validation_images prompts, each with its options and the run's defaults."""
        lines = self.validation_prompts[: self.num_validation_images]
        return sample_prompts(lines, self.image_size, self.seed, self.validation_steps,
                              self.validation_guidance_scale)  # fmt: skip

    @property
    def trackers(self) -> set[str]:
        """Where metrics go besides metrics.csv: tensorboard and/or wandb."""
        chosen = {"tensorboard", "wandb"} if self.report_to == "all" else {self.report_to}
        return (chosen - {"none"}) | ({"wandb"} if self.wandb_project else set())

    @property
    def schedule_depends_on_length(self) -> bool:
        """linear and cosine decay reach zero at the last step: another length, another run."""
        return self.lr_scheduler in DECAYING_SCHEDULES

    @property
    def subset_plans(self) -> list[SubsetPlan]:
        """How training visits each subset (one for a plain data_dir), unset keys from the run."""
        subsets = self.subsets or (Subset(image_dir=self.data_dir or "."),)
        return plan_subsets(subsets, random_flip=self.random_flip,
                            caption_dropout=self.caption_dropout,
                            shuffle_caption=self.shuffle_caption, keep_tokens=self.keep_tokens)  # fmt: skip

    @property
    def lora_target(self) -> str | tuple[str, ...]:
        return self.lora_targets or self.lora_target_mode

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (config.yaml slice or config.json); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; valid: {sorted(known)}")
        values = dict(values)
        for key in ("lora_targets", "validation_prompts", "optimizer_args"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        if values.get("subsets"):
            values["subsets"] = tuple(
                s if isinstance(s, Subset) else Subset.from_dict(s, f"subsets[{i}]")
                for i, s in enumerate(values["subsets"])
            )
        return cls(**values)


def for_model(cfg: TrainConfig, scheduler_config: dict, source: str) -> TrainConfig:
    """`cfg` with the model's prediction type and timestep count filled in, checked against them.

    A LoRA trained for another objective than its base model's learns the wrong target, and
    timesteps past the schedule's end index outside its tables: both are refused here.
    """
    model_pred = scheduler_config.get("prediction_type", "epsilon")
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if cfg.prediction_type is not None and cfg.prediction_type != model_pred:
        raise UserError(
            f"--prediction_type {cfg.prediction_type} but {source} says {model_pred!r}; "
            "drop --prediction_type to train with the model's"
        )
    if cfg.timestep_max is not None and cfg.timestep_max > steps:
        raise UserError(
            f"--timestep_max {cfg.timestep_max} is past the {steps} timesteps of {source}; "
            f"pass at most {steps}, or drop it"
        )
    top = steps if cfg.timestep_max is None else cfg.timestep_max
    if cfg.timestep_min >= top:
        raise UserError(f"--timestep_min {cfg.timestep_min} must be below {top}")
    return replace(cfg, prediction_type=model_pred, timestep_max=top)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
