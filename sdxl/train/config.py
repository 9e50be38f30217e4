"""Every setting of a training run, validated once and written as config.json beside the outputs.

Each field is described once, where it is declared (`setting`): its help text and choices
(sdxl/cli/train.py builds its parser from them), its flag where the original project's name
differs, and its group: how a change relates to what a run learns, which the trainer's resume
check and the workflow's rerun decisions both read (RUNTIME_SETTINGS ... RESUME_SAFE below).
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from types import NoneType

from sdxl import config_fields
from sdxl.dataset_config import Subset, SubsetPlan, plan_subsets
from sdxl.errors import UserError
from sdxl.train.sample_prompts import SamplePrompt, sample_prompts

# The groups. Learned: a change is another run; no checkpoint of the old one resumes.
LEARNED = "learned"
# Paths, speed, logging and bookkeeping: a checkpoint made under other values resumes, and the
# workflow reruns nothing when they change. (compile and fused_qkv change float rounding, not
# the maths.)
RUNTIME = "runtime"
# Validation grids: drawn during training by the CLI, by their own rule in the workflow.
VALIDATION = "validation"
# How long to train: a longer run continues a shorter one (unless the schedule decays).
LENGTH = "length"
# Which LoRA snapshots a run keeps: checked against the files when a run continues.
SNAPSHOT = "snapshot"

DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def setting(default=MISSING, help: str = "", *, group: str = LEARNED, choices: tuple = (),
            flags: tuple[str, ...] | None = None, cli: dict | None = None):  # fmt: skip
    """A TrainConfig field and its description: `choices` are the CLI's and checked; `flags` are
    the CLI's names where they are not --<field> (`()`: no flag); `cli`, more argparse arguments."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "flags": flags, "cli": cli or {}})  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Flag names and defaults follow the original project's train_sdxl.py."""

    # --dataset_config may stand in for data_dir on the command line (sdxl/cli/train.py).
    data_dir: str = setting(
        help="image+caption folder, or a cache folder built by the pipeline (or --dataset_config)",
        group=RUNTIME, cli={"default": ""},
    )  # fmt: skip
    output_dir: str = setting("./outputs", group=RUNTIME)
    pretrained_model: str = setting(
        "./weights/sdxl-base-1.0",
        "diffusers SDXL folder, Hugging Face repo id (downloaded once), single-file "
        ".safetensors (converted once into ~/.cache/sdxl-pipeline/models) or builtin:tiny",
    )
    config_source: str | None = setting(
        None,
        "single files: a diffusers folder or Hub id with the configs and tokenizers "
        "(default: SDXL base 1.0's, fetched once)",
        group=RUNTIME,
    )
    vae_model: str | None = setting(
        None, "optional diffusers VAE folder used to encode the latents"
    )
    # LoRA
    lora_rank: int = setting(8)
    lora_alpha: float = setting(32.0)
    lora_dropout: float = setting(0.0)
    lora_target_mode: str = setting(
        "attention",
        choices=("attention", "attention_out", "all"),  # sdxl.lora.TARGETS
    )
    lora_targets: tuple[str, ...] = setting(
        (), "regexes over UNet module paths (overrides the mode)", cli={"nargs": "+"}
    )
    lora_conv: bool = setting(False, "also train LoRA on resnet convs (LoCon)")
    lora_type: str = setting(
        "lora",
        "dora: weight-decomposed LoRA (DoRA, LyCORIS dora_wd), saved with dora_scale keys",
        choices=("lora", "dora"),
    )
    # optimisation
    batch_size: int = setting(1)
    gradient_accumulation_steps: int = setting(1)
    num_epochs: int = setting(10, group=LENGTH)
    max_steps: int | None = setting(None, "stop after this many optimizer steps", group=LENGTH)
    learning_rate: float = setting(1e-4)
    lr_scheduler: str = setting("constant", choices=("constant", *DECAYING_SCHEDULES))
    lr_scheduler_num_cycles: int = setting(
        1, "cosine_with_restarts: how many times the cosine starts again from the base rate"
    )
    lr_scheduler_power: float = setting(1.0, "polynomial: the decay's power (1: linear)")
    warmup_steps: int = setting(0)
    adam_weight_decay: float = setting(1e-2)
    adam_beta1: float = setting(0.9)
    adam_beta2: float = setting(0.999)
    adam_epsilon: float = setting(1e-8)
    use_8bit_adam: bool = setting(
        False, "bitsandbytes AdamW8bit (the same as --optimizer adamw8bit)", flags=("--8_bit_adam",)
    )
    optimizer: str = setting(
        "adamw",
        "adamw (torch, fused), adamw8bit (bitsandbytes), prodigy (prodigyopt), adafactor "
        "(torch), lion (lion-pytorch); `uv sync --extra optimizers` installs the packages",
        choices=("adamw", "adamw8bit", "prodigy", "adafactor", "lion"),
    )
    optimizer_args: tuple[str, ...] = setting(
        (),
        "extra optimizer arguments as kohya writes them, e.g. d_coef=2.0 decouple=True",
        cli={"nargs": "*", "metavar": "KEY=VALUE"},
    )
    max_grad_norm: float = setting(1.0, "<= 0 disables clipping")
    precision: str = setting("bf16", choices=("bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = setting(True, group=RUNTIME)
    use_ema: bool = setting(False)
    ema_decay: float = setting(0.9999)
    # speed (sdxl/train/step.py). CUDA graphs are opt-in until a GPU run has verified them.
    compile: bool | None = setting(
        None, "torch.compile the training step (default: on for CUDA, off on the CPU)",
        group=RUNTIME,
    )  # fmt: skip
    compile_mode: str = setting(
        "full", "full: the whole loss as one graph; regional: each transformer block and resnet",
        group=RUNTIME, choices=("full", "regional"),
    )  # fmt: skip
    cuda_graphs: bool | None = setting(
        False,
        "replay each bucket's whole step as one CUDA graph (opt-in until verified on a GPU)",
        group=RUNTIME,
    )
    checkpointing_mode: str = setting(
        "full",
        "with --gradient_checkpointing: recompute whole blocks, or keep attention outputs",
        group=RUNTIME, choices=("full", "selective"),
    )  # fmt: skip
    fused_qkv: bool = setting(
        False, "run each attention's q/k/v as one GEMM (the files keep the names)", group=RUNTIME
    )
    # objective
    prediction_type: str | None = setting(
        None, "the model's objective (default: what its scheduler_config.json says)",
        choices=("epsilon", "v_prediction"),
    )  # fmt: skip
    min_snr_gamma: float | None = setting(
        None, "min-SNR-gamma weighting (off unless set; 5 is usual)"
    )
    noise_offset: float = setting(0.0)
    caption_dropout: float = setting(
        0.0,
        "probability of an empty caption",
        flags=("--caption_dropout", "--caption_dropout_rate"),
    )
    # text encoders (sdxl/train/text_encoding.py): with any of these on, captions are encoded
    # in each step instead of read from the text cache. kohya's names and semantics.
    train_text_encoder: bool = setting(
        False, "also train a LoRA on both text encoders (kohya's; text is then encoded each step)"
    )
    text_encoder_lr: float | None = setting(
        None, "the text encoders' LoRA learning rate (default: --learning_rate)"
    )
    unet_lr: float | None = setting(
        None, "the UNet LoRA's learning rate (default: --learning_rate)"
    )
    shuffle_caption: bool = setting(
        False, "shuffle each caption's comma-separated tags every time it is seen (kohya's)"
    )
    keep_tokens: int = setting(0, "with --shuffle_caption: keep the first N tags in front")
    timestep_min: int = setting(0)
    timestep_max: int | None = setting(
        None, "exclusive upper timestep (default: the schedule's num_train_timesteps)"
    )
    # data
    subsets: tuple[Subset, ...] = setting(
        (),
        "kohya's dataset subsets (sdxl/dataset_config.py: --dataset_config, the pipeline's "
        "data.subsets); empty: data_dir is the one folder (or a pipeline cache of one)",
        flags=(),
    )
    prior_loss_weight: float = setting(
        1.0, "loss weight of regularization (is_reg) images, kohya's"
    )
    image_size: int = setting(1024, "bucket area = image_size^2 (512 or 1024 families)")
    center_crop: bool = setting(False, "center crop instead of random crop")
    random_flip: bool = setting(True)
    min_image_size: int = setting(64)
    strict_data: bool = setting(False, "fail on any bad dataset item instead of skipping it")
    cache_batch_size: int = setting(4, group=RUNTIME, flags=())
    # checkpoints, snapshots and logging
    save_interval: int = setting(1, "checkpoint every N epochs", group=RUNTIME)
    checkpoint_steps: int = setting(0, "checkpoint every N steps (0: off)", group=RUNTIME)
    save_every_n_steps: int = setting(
        0, "also write <output_name>-stepNNNNNNNN.safetensors every N steps (0: off)",
        group=SNAPSHOT,
    )  # fmt: skip
    save_every_n_epochs: int = setting(
        0, "also write that snapshot at the end of every N epochs (kohya's; 0: off)",
        group=SNAPSHOT,
    )  # fmt: skip
    save_last_n: int = setting(
        0, "keep only the newest N snapshots and step checkpoints (0: all)", group=SNAPSHOT
    )
    output_name: str = setting("lora", "file name prefix of the snapshots", group=SNAPSHOT)
    resume_from: str | None = setting(
        "auto",
        "checkpoint path, 'auto' (the newest in output_dir that this run can continue: "
        "a longer run continues a shorter one) or 'none'",
        group=RUNTIME,
    )
    log_interval: int = setting(10, group=RUNTIME)
    report_to: str = setting(
        "none",
        "where metrics (and validation grids) go besides metrics.csv; --wandb_project "
        "alone also means wandb",
        group=RUNTIME, choices=("none", "tensorboard", "wandb", "all"),  # diffusers' --report_to
    )  # fmt: skip
    logging_dir: str | None = setting(
        None, "TensorBoard's folder (default: output_dir/logs)", group=RUNTIME
    )
    wandb_project: str | None = setting(None, group=RUNTIME)
    wandb_run_name: str | None = setting(None, group=RUNTIME)
    # The prompt lines of sample_prompts (on the command line) or of config.yaml.
    validation_prompts: tuple[str, ...] = setting((), group=VALIDATION, flags=())
    validation_interval: int = setting(
        0, "steps between grids (0: off; grids at step 0 and the end come with any prompts)",
        group=VALIDATION,
    )  # fmt: skip
    num_validation_images: int = setting(4, group=VALIDATION)
    validation_guidance_scale: float = setting(7.5, group=VALIDATION)
    validation_steps: int = setting(20, group=VALIDATION)
    # kohya's names (sdxl/train/sample_prompts.py): sample_prompts is the file the prompts were
    # read from (recorded with its lines); sample_every_n_steps is validation_interval.
    sample_prompts: str | None = setting(
        None,
        "prompts for sample grids, one per line, each may end with kohya's --n negative "
        "--w W --h H --d seed --s steps --l cfg (--sample_prompts: kohya's name)",
        group=VALIDATION, flags=("--validation_caption_file", "--sample_prompts"),
    )  # fmt: skip
    sample_every_n_steps: int = setting(
        0, "kohya's name for --validation_interval", group=VALIDATION
    )
    sample_every_n_epochs: int = setting(
        0, "also a grid at the end of every Nth epoch (0: off)", group=VALIDATION
    )
    device: str = setting("auto", group=RUNTIME, cli={"choices": ("auto", "cpu", "cuda")})
    seed: int = setting(0)

    def __post_init__(self):
        for f in fields(self):
            value, allowed = getattr(self, f.name), f.metadata["choices"]
            if allowed and value not in allowed and not (value is None and f.name in OPTIONAL):
                raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(
                f"use_8bit_adam is AdamW8bit; it contradicts optimizer {self.optimizer!r}"
            )
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
        values = dict(values)
        for key in SEQUENCES:  # lists in YAML and JSON
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        values["subsets"] = tuple(
            s if isinstance(s, Subset) else Subset.from_dict(s, f"subsets[{i}]")
            for i, s in enumerate(values.get("subsets") or ())
        )
        return config_fields.from_dict(cls, values, "training settings")


# Each field's type (str | None, tuple[str, ...], ...): the parser's and from_dict's guide.
TYPES = typing.get_type_hints(TrainConfig)
OPTIONAL = frozenset(name for name, kind in TYPES.items() if NoneType in typing.get_args(kind))
SEQUENCES = tuple(name for name, kind in TYPES.items() if typing.get_origin(kind) is tuple)


def _group(group: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["group"] == group)


RUNTIME_SETTINGS = _group(RUNTIME)
VALIDATION_SETTINGS = _group(VALIDATION)
LENGTH_SETTINGS = _group(LENGTH)
SNAPSHOT_SETTINGS = _group(SNAPSHOT)
# Settings that may change between a run and its resumption without changing what is learned
# (the length: see Trainer._resume for decaying schedules; snapshots: checked against the files).
RESUME_SAFE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["group"] != LEARNED)


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
