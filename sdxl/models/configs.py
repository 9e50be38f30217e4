"""Component configs: the dataclasses our networks are built from, and reference `config.json`s.

Each `*Config` holds only what varies within the one architecture we implement; its `from_dict`
reads a diffusers/transformers `config.json` strictly (an unknown key or an unsupported value is
a ValueError naming it), so the model files hold math only. `SDXL_BASE` is
stabilityai/stable-diffusion-xl-base-1.0's configs (used to build full-size models on the meta
device and to convert single-file checkpoints); `TINY` is the deterministic tiny SDXL that
`sdxl.tiny` writes for tests and the demo. Same architecture, other numbers.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

# -------------------------------------------- UNet (diffusers UNet2DConditionModel)

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

# Keys with one supported value: key -> (diffusers' default when absent, values we accept).
_UNET_FIXED: dict[str, tuple[object, tuple[object, ...]]] = {
    "act_fn": ("silu", ("silu",)),
    "addition_embed_type": (None, ("text_time",)),
    "attention_type": ("default", ("default",)),
    "center_input_sample": (False, (False,)),
    "class_embed_type": (None, (None,)),
    "class_embeddings_concat": (False, (False,)),
    "conv_in_kernel": (3, (3,)),
    "conv_out_kernel": (3, (3,)),
    "cross_attention_norm": (None, (None,)),
    "downsample_padding": (1, (1,)),
    "dropout": (0.0, (0.0,)),
    "dual_cross_attention": (False, (False,)),
    "encoder_hid_dim": (None, (None,)),
    "encoder_hid_dim_type": (None, (None,)),
    "flip_sin_to_cos": (True, (True,)),
    "freq_shift": (0, (0,)),
    "mid_block_only_cross_attention": (None, (None, False)),
    "mid_block_scale_factor": (1, (1,)),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)),
    # diffusers itself refuses num_attention_heads; the head counts come from attention_head_dim
    "num_attention_heads": (None, (None,)),
    "num_class_embeds": (None, (None,)),
    "only_cross_attention": (False, (False,)),
    "resnet_out_scale_factor": (1.0, (1.0,)),
    "resnet_skip_time_act": (False, (False,)),
    "resnet_time_scale_shift": ("default", ("default",)),
    "reverse_transformer_layers_per_block": (None, (None,)),
    "time_cond_proj_dim": (None, (None,)),
    "time_embedding_act_fn": (None, (None,)),
    "time_embedding_dim": (None, (None,)),
    "time_embedding_type": ("positional", ("positional",)),
    "timestep_post_act": (None, (None,)),
    "upcast_attention": (False, (None, False)),
    "use_linear_projection": (False, (True,)),
}
# Bookkeeping: the default resolution, and a head count that only other addition types use.
_UNET_IGNORED = ("sample_size", "addition_embed_type_num_heads")
_UNET_REQUIRED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "transformer_layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "norm_num_groups",
    "norm_eps",
)


@dataclass(frozen=True)
class UNetConfig:
    """What varies across SDXL-family UNets; per-level tuples run from the top (full-res) level."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    num_attention_heads: tuple[int, ...]  # real head counts (diffusers' "attention_head_dim")
    cross_attention_dim: int
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    norm_num_groups: int
    norm_eps: float

    def __post_init__(self):
        n = len(self.block_out_channels)
        per_level = ("layers_per_block", "transformer_layers_per_block", "num_attention_heads")
        for key in ("down_block_types", "up_block_types", *per_level):
            _check_unet_len(key, getattr(self, key), n)
        _check_unet_choices("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES)
        _check_unet_choices("up_block_types", self.up_block_types, UP_BLOCK_TYPES)
        for key in ("block_out_channels", *per_level):
            _check_unet_positive(key, getattr(self, key))
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                f"entry {list(self.block_out_channels)}"
            )

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding every resnet receives (4x the first level's width)."""
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from a diffusers `unet/config.json` dict; raise ValueError naming any unsupported key."""
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _UNET_IGNORED}
        unknown = sorted(set(d) - set(_UNET_FIXED) - set(_UNET_REQUIRED))
        if unknown:
            raise ValueError(f"unet config: unknown key(s) {unknown}")
        for key, (default, allowed) in _UNET_FIXED.items():
            _check_fixed(key, d.get(key, default), allowed, key not in d)
        missing = [k for k in _UNET_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"unet config: missing key(s) {missing}")
        n = len(d["block_out_channels"])
        # diffusers' naming quirk: with num_attention_heads null, attention_head_dim is the head count.
        return cls(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            block_out_channels=tuple(d["block_out_channels"]),
            down_block_types=tuple(d["down_block_types"]),
            up_block_types=tuple(d["up_block_types"]),
            layers_per_block=_unet_per_level("layers_per_block", d["layers_per_block"], n),
            transformer_layers_per_block=_unet_per_level(
                "transformer_layers_per_block", d["transformer_layers_per_block"], n
            ),
            num_attention_heads=_unet_per_level("attention_head_dim", d["attention_head_dim"], n),
            cross_attention_dim=_unet_int("cross_attention_dim", d["cross_attention_dim"]),
            addition_time_embed_dim=_unet_int(
                "addition_time_embed_dim", d["addition_time_embed_dim"]
            ),
            projection_class_embeddings_input_dim=_unet_int(
                "projection_class_embeddings_input_dim", d["projection_class_embeddings_input_dim"]
            ),
            norm_num_groups=_unet_int("norm_num_groups", d["norm_num_groups"]),
            norm_eps=float(d["norm_eps"]),
        )


def _check_fixed(key: str, value: object, allowed: tuple, absent: bool) -> None:
    """Accept a key whose value is one we support (a list of all-False counts as False)."""
    if key == "only_cross_attention" and isinstance(value, list | tuple) and not any(value):
        value = False
    if not any(value == a for a in allowed):
        note = " (diffusers' default when the key is absent)" if absent else ""
        raise ValueError(
            f"unet config: {key}={value!r}{note} is not supported; supported: {list(allowed)}"
        )


def _unet_int(key: str, value: object) -> int:
    """A plain positive int, or a ValueError naming the key."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"unet config: {key} must be a positive int, got {value!r}")
    return value


def _unet_per_level(key: str, value: object, n: int) -> tuple[int, ...]:
    """An int or a per-level list of ints, as a tuple with one entry per level."""
    values = [value] * n if isinstance(value, int) else value
    if not isinstance(values, list | tuple):
        raise ValueError(f"unet config: {key} must be an int or a list of ints, got {value!r}")
    return tuple(_unet_int(key, v) for v in values)


def _check_unet_len(key: str, values: tuple, n: int) -> None:
    if len(values) != n:
        raise ValueError(
            f"unet config: {key} has {len(values)} entries, block_out_channels has {n}"
        )


def _check_unet_choices(key: str, values: tuple, choices: tuple) -> None:
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"unet config: {key} {bad} not supported; supported: {list(choices)}")


def _check_unet_positive(key: str, values: tuple) -> None:
    if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in values):
        raise ValueError(f"unet config: {key} must hold positive ints, got {list(values)}")


# ---------------------------------------------------- VAE (diffusers AutoencoderKL)

# Keys that must hold exactly this value (the only architecture we implement).
_VAE_FIXED = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_VAE_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_VAE_IGNORED = {"sample_size"}  # only sets diffusers' default tile size


@dataclass(frozen=True)
class VAEConfig:
    """What varies between AutoencoderKL checkpoints; the defaults are SDXL base."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    force_upcast: bool = True

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups} does not divide "
                    f"block_out_channels entry {c}"
                )

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Build from a diffusers `vae/config.json` dict; reject what we do not implement."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, block_types = {}, {}
        for key, value in d.items():
            if key.startswith("_") or key in _VAE_IGNORED:
                continue
            if key in _VAE_FIXED:
                if value != _VAE_FIXED[key]:
                    raise ValueError(f"unsupported {key}={value!r}; only {_VAE_FIXED[key]!r}")
            elif key in _VAE_BLOCK_TYPES:
                block_types[key] = value
            elif key in fields:
                kwargs[key] = tuple(value) if key == "block_out_channels" else value
            else:
                raise ValueError(f"unknown VAE config key {key!r}")
        cfg = cls(**kwargs)
        for key, value in block_types.items():
            _check_vae_block_types(key, value, len(cfg.block_out_channels))
        return cfg


def _check_vae_block_types(key: str, value: list, levels: int) -> None:
    """Down/up block types must be the plain VAE blocks, one per level."""
    want = _VAE_BLOCK_TYPES[key]
    if any(t != want for t in value):
        raise ValueError(f"unsupported {key}={value!r}; only {want!r} blocks")
    if len(value) != levels:
        raise ValueError(f"{key} has {len(value)} entries but block_out_channels has {levels}")


# --------------------------------------- text encoders (transformers CLIPTextModel)

_CLIP_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
_CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
# config.json entries that describe initialisation, tokens, provenance or generation defaults
# (older transformers wrote every PretrainedConfig attribute), not the network.
_CLIP_BOOKKEEPING = frozenset(
    """
    architectures bos_token_id pad_token_id sep_token_id decoder_start_token_id
    initializer_range initializer_factor torch_dtype dtype transformers_version use_bfloat16
    output_attentions output_hidden_states return_dict use_cache torchscript pruned_heads
    chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder tie_word_embeddings id2label label2id
    problem_type finetuning_task tokenizer_class prefix task_specific_params tf_legacy_loss
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    """.split()  # noqa: SIM905 - a word list reads better than 57 quoted strings
)
_CLIP_ONLY_SUPPORTED = {"model_type": "clip_text_model", "dropout": 0.0, "attention_dropout": 0.0}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The widths and depths that differ between CLIP-L and bigG (and the tiny test models)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    with_projection: bool = False

    def __post_init__(self) -> None:
        if self.hidden_act not in _CLIP_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {_CLIP_ACTIVATIONS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """Build from a transformers CLIPTextConfig `config.json` dict."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"with_projection": _with_projection(d.get("architectures"))}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in _CLIP_ONLY_SUPPORTED:
                if value != _CLIP_ONLY_SUPPORTED[key]:
                    raise ValueError(
                        f"{key}={value!r} is not supported (only {_CLIP_ONLY_SUPPORTED[key]!r})"
                    )
            elif not key.startswith("_") and key not in _CLIP_BOOKKEEPING:
                raise ValueError(f"unsupported CLIP text config key {key!r}")
        return cls(**kwargs)


def _with_projection(architectures: list[str] | None) -> bool:
    """CLIPTextModelWithProjection adds `text_projection`; the bare CLIPTextModel does not."""
    if not architectures:
        return False
    if len(architectures) != 1 or architectures[0] not in _CLIP_ARCHITECTURES:
        raise ValueError(
            f"architectures {architectures!r} is not supported; "
            f"use one of {sorted(_CLIP_ARCHITECTURES)}"
        )
    return _CLIP_ARCHITECTURES[architectures[0]]


# ---------------------------------------------------------------- reference configs

SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

_UNET_SDXL = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_VAE_SDXL = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

_TEXT_ENCODER_SDXL = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

_TEXT_ENCODER_2_SDXL = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SDXL_BASE = {
    "unet": _UNET_SDXL,
    "vae": _VAE_SDXL,
    "text_encoder": _TEXT_ENCODER_SDXL,
    "text_encoder_2": _TEXT_ENCODER_2_SDXL,
}

# Tiny: text widths 32 + 32 -> cross-attention 64; pooled 32 + 6 time ids x 8 -> 80.
BUILTIN_TINY = "builtin:tiny"  # the model source that names it (sdxl/tiny.py writes the model)
TINY_VOCAB_SIZE = 1000  # sdxl.tiny writes a byte-level BPE vocabulary of exactly this size

TINY = {
    "unet": {
        **_UNET_SDXL,
        "addition_time_embed_dim": 8,
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [16, 32, 32],
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "projection_class_embeddings_input_dim": 80,
        "sample_size": 16,
        "transformer_layers_per_block": [1, 1, 2],
    },
    "vae": {
        **_VAE_SDXL,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 128,
    },
    "text_encoder": {
        **_TEXT_ENCODER_SDXL,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "projection_dim": 32,
        "vocab_size": TINY_VOCAB_SIZE,
    },
    "text_encoder_2": {
        **_TEXT_ENCODER_2_SDXL,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "projection_dim": 32,
        "vocab_size": TINY_VOCAB_SIZE,
    },
}


def component_config(preset: dict, name: str) -> dict:
    """A deep copy of one component's config (callers may mutate it)."""
    return copy.deepcopy(preset[name])
