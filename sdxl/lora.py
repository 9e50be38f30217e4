"""LoRA for the SDXL UNet: layers that keep the base names, injection, merge, several LoRAs at once.

A LoRA layer replaces an `nn.Linear` / `nn.Conv2d` in place and keeps its `weight` and `bias`
parameters under the same names, so the base checkpoint keys do not change. It adds the kohya
names `lora_down.weight` [r, in(, k, k)], `lora_up.weight` [out, r(, 1, 1)] and a 0-d `alpha`
buffer, and computes W x + multiplier * (alpha / r) * up(down(dropout(x))) (Hu et al. 2021,
arXiv:2106.09685). `up` starts at zero, so injection does not change the output.

Precision: LoRA tensors are always fp32 and the LoRA path runs in fp32 whatever the base dtype
(the seed kept them in bf16 and lost ~94% of the updates to rounding); only its result is cast to
the base output dtype. Casting the whole model (`model.to(torch.bfloat16)`) after injection would
cast the LoRA tensors too: cast the base first, then inject; `lora_parameters` checks it.

Our LoRA state dict (`lora_state_dict`) is keyed by module path: `<path>.lora_down.weight`,
`<path>.lora_up.weight`, `<path>.alpha`; `sdxl.lora_formats` converts it to and from files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.config_fields import from_dict

TARGETS = ("attention", "attention_out", "all")

# Module-path patterns (re.search). "attentions.N" is a Transformer2DModel in diffusers naming.
_BLOCK = r"(?:^|\.)attentions\.\d+\.transformer_blocks\.\d+\."
_TARGET_PATTERNS = {
    "attention": (_BLOCK + r"attn[12]\.to_[qkv]$",),
    "attention_out": (_BLOCK + r"attn[12]\.(?:to_[qkv]|to_out\.0)$",),
    "all": (r"(?:^|\.)attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\..+)$",),
}
# LoCon: the convs of resnets (3x3 conv1/conv2, 1x1 conv_shortcut) and of the samplers, like kohya.
_CONV_PATTERNS = (
    r"(?:^|\.)resnets\.\d+\.(?:conv1|conv2|conv_shortcut)$",
    r"(?:^|\.)(?:downsamplers|upsamplers)\.0\.conv$",
)
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


@dataclass(frozen=True)
class LoRAConfig:
    """Which UNet layers get a LoRA, and its rank, alpha and dropout.

    target: "attention" (to_q/to_k/to_v of attn1 and attn2), "attention_out" (+ to_out.0),
    "all" (every Linear of the transformers: attention, ff.net.0.proj, ff.net.2, proj_in,
    proj_out), or a list of regexes searched in module paths (Linear and Conv2d modules).
    conv: also LoRA on the resnet and sampler convs (LoCon); 3x3 convs use conv_rank/conv_alpha
    (default rank/alpha), 1x1 convs and Linears use rank/alpha, as kohya does.
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target: str | tuple[str, ...] = "attention"
    conv: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dora: bool = False  # DoRA (weight-decomposed) layers instead of plain LoRA

    def __post_init__(self):
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target", _check_target(self.target))
        if not isinstance(self.conv, bool):
            raise ValueError(f"LoRA conv must be true or false, got {self.conv!r}")
        if self.conv_rank is not None:
            _check_rank("conv_rank", self.conv_rank)
        if self.conv_alpha is not None:
            _check_alpha("conv_alpha", self.conv_alpha)
        if not isinstance(self.dora, bool):
            raise ValueError(f"LoRA dora must be true or false, got {self.dora!r}")
        uses_conv = self.conv or not isinstance(self.target, str)
        if not uses_conv and (self.conv_rank is not None or self.conv_alpha is not None):
            raise ValueError("LoRA conv_rank/conv_alpha are set but conv is false")

    @classmethod
    def from_dict(cls, d: Mapping) -> LoRAConfig:
        """Build from a plain dict (e.g. a run config); raise ValueError naming unknown keys."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        if isinstance(d.get("target"), list):
            d["target"] = tuple(d["target"])
        return from_dict(cls, d, "key(s) of the LoRA config:")

    def rank_alpha(self, module: nn.Module) -> tuple[int, float]:
        """(rank, alpha) for one target module: conv_* for spatial convs, else rank/alpha."""
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            rank = self.conv_rank if self.conv_rank is not None else self.rank
            return rank, self.conv_alpha if self.conv_alpha is not None else self.alpha
        return self.rank, self.alpha


def _check_rank(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoRA {key} must be a positive integer, got {value!r}")


def _check_alpha(key: str, value: object) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoRA {key} must be a positive number, got {value!r}")


def _check_target(target: object) -> str | tuple[str, ...]:
    """A named target, or a non-empty tuple of valid regexes."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(
                f"LoRA target {target!r} is not one of {list(TARGETS)} (or give a list of regexes)"
            )
        return target
    if not isinstance(target, Sequence) or not target:
        raise ValueError(f"LoRA target must be one of {list(TARGETS)} or a list of regexes")
    for pattern in target:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"LoRA target regex {pattern!r} is invalid: {e}") from None
    return tuple(target)


# ----------------------------------------------------------------------------- layers


class _LoRALayer(nn.Module):
    """Base weight/bias plus fp32 lora_down/lora_up; subclasses give the base op."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module, alpha: float, dropout):
        super().__init__()
        self.weight = base.weight  # the base parameters, under their checkpoint names
        self.register_parameter("bias", base.bias)
        self.lora_down = down  # (r, in[, k, k])
        self.lora_up = up  # (out, r[, 1, 1])
        self.rank = down.weight.shape[0]
        device = base.weight.device
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.multiplier = 1.0
        self.merged = False

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        return y + self.lora_forward(x).to(y.dtype)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term alone, in the factors' dtype (fp32 unless the model was cast later)."""
        h = self.lora_up(self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype))))
        return h * (self.alpha * (self.multiplier / self.rank))

    def delta_weight(self) -> torch.Tensor:
        """multiplier * (alpha / r) * up @ down in fp32, shaped like `weight`."""
        up = self.lora_up.weight.float().flatten(1)  # (out, r)
        down = self.lora_down.weight.float().flatten(1)  # (r, in * k * k)
        scale = self.alpha.float() * (self.multiplier / self.rank)
        return (up @ down).view(self.weight.shape) * scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add the LoRA delta to `weight` (in fp32, then cast); forward then skips the LoRA path."""
        if self.merged:
            raise ValueError("LoRA is already merged; call unmerge_lora first")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta that `merge` added (exact in fp32, within rounding in bf16/fp16)."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, multiplier={self.multiplier}, merged={self.merged}"


class LoRALinear(_LoRALayer):
    """nn.Linear with a LoRA; state dict: weight, bias, lora_down.weight, lora_up.weight, alpha."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        down = _zero(_LinearFactor(base.in_features, rank, **kw))
        up = _zero(_LinearFactor(rank, base.out_features, **kw))
        super().__init__(base, down, up, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's weight and bias."""
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        return _adopt(plain, self)


class LoRAConv2d(_LoRALayer):
    """nn.Conv2d with a LoRA (LoCon): down has the base kernel/stride/padding, up is 1x1."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRA supports Conv2d with groups=1 and zero padding only")
        k = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        down = _zero(_ConvFactor(base.in_channels, rank, base.kernel_size, **k, **kw))
        up = _zero(_ConvFactor(rank, base.out_channels, 1, **kw))
        super().__init__(base, down, up, alpha, dropout)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def to_base(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding this layer's weight and bias."""
        k = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        has_bias = self.bias is not None
        plain = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, bias=has_bias, device="meta", **k
        )
        return _adopt(plain, self)


class _DoRA:
    """DoRA on a LoRA layer (Liu et al. 2024, arXiv:2402.09353), numerically as peft's use_dora.

    W' = m * (W + s up@down) / ||W + s up@down||, the norm per output row (channel) and detached
    (paper §4.3), m = `dora_scale` [out, 1(, 1, 1)] (fp32, trainable, initialised to ||W||), s =
    alpha / r. The forward adds (m/n - 1) W x + (m/n) s up(down(x)), dropout on x, as peft does.
    `multiplier` interpolates, W + multiplier * (W' - W) (0 = off, 1 = W'), as ComfyUI does.
    """

    def _init_magnitude(self) -> None:
        norm = self._norm(self.weight.detach().float()).to(self.lora_down.weight.device)
        self.dora_scale = nn.Parameter(norm)  # (out, 1[, 1, 1])

    @staticmethod
    def _norm(weight: torch.Tensor) -> torch.Tensor:
        """||W||_2 per output row, shaped (out, 1[, 1, 1]) to broadcast over W."""
        return weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.ndim - 1))

    def _lora_delta(self) -> torch.Tensor:
        """s * up @ down in fp32 (no multiplier), shaped like `weight`."""
        up = self.lora_up.weight.float().flatten(1)  # (out, r)
        down = self.lora_down.weight.float().flatten(1)  # (r, in * k * k)
        return (up @ down).view(self.weight.shape) * (self.alpha.float() / self.rank)

    def magnitude_scale(self) -> torch.Tensor:
        """m / ||W + s up@down|| (the norm detached), fp32, shaped (out, 1[, 1, 1])."""
        if self.merged:
            raise ValueError("DoRA layer is merged; call unmerge_lora first")
        with torch.no_grad():
            norm = self._norm(self.weight.float() + self._lora_delta())
        return self.dora_scale / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        return y + self.dora_forward(x, y).to(y.dtype)

    def dora_forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The DoRA term alone in fp32; y: the base output for x, if already computed."""
        dtype = self.lora_down.weight.dtype
        if self.training and isinstance(self.dropout, nn.Dropout):
            x, y = self.dropout(x), None  # peft: the base term sees the dropped x too
        y = self.base_forward(x) if y is None else y
        if self.bias is not None:
            y = y - self.bias.view(-1, *[1] * (y.ndim - 2 if self.weight.ndim == 4 else 0))
        g = self.magnitude_scale().view(-1, *[1] * (self.weight.ndim - 2))  # (out[, 1, 1])
        lora = self.lora_up(self.lora_down(x.to(dtype))) * (self.alpha / self.rank)
        return ((g - 1) * y.to(dtype) + g * lora) * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        """multiplier * (W' - W) in fp32, shaped like `weight` (from the unmerged weight)."""
        w = self.weight.float()
        scale = self.magnitude_scale().detach()
        return (scale * (w + self._lora_delta()) - w) * self.multiplier

    @torch.no_grad()
    def merge(self) -> None:
        """Bake W + multiplier * (W' - W) into `weight` (fp32 maths, then cast)."""
        if self.merged:
            raise ValueError("LoRA is already merged; call unmerge_lora first")
        # W + u (g (W + D) - W) = a W + b D with per-row a, b: kept to invert it exactly.
        g = self.magnitude_scale()
        self._merged_ab = (1 + self.multiplier * (g - 1), self.multiplier * g)
        a, b = self._merged_ab
        self.weight.copy_((a * self.weight.float() + b * self._lora_delta()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact in fp32, within rounding in bf16/fp16)."""
        if self.merged:
            a, b = self._merged_ab
            w = (self.weight.float() - b * self._lora_delta()) / a
            self.weight.copy_(w.to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


class DoRALinear(_DoRA, LoRALinear):
    """LoRALinear with DoRA's magnitude; state dict adds dora_scale [out, 1]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self._init_magnitude()


class DoRAConv2d(_DoRA, LoRAConv2d):
    """LoRAConv2d with DoRA's magnitude; state dict adds dora_scale [out, 1, 1, 1]."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self._init_magnitude()


LoRAModule = LoRALinear | LoRAConv2d  # DoRALinear / DoRAConv2d are subclasses


def stacked_lora_delta(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """The LoRA terms of Linears that read the same x, concatenated like their outputs.

    For a fused projection GEMM (`Attention.fuse_projections`): one down GEMM over
    cat(down_q, down_k, down_v) and one up GEMM over the block diagonal of the scaled ups, instead
    of six small GEMMs. Ranks and alphas may differ per layer; a plain Linear or a merged LoRA
    gets an empty block. In training with dropout each LoRA draws its own mask, as unfused;
    DoRA layers are also computed one by one.
    None when no layer has an active LoRA. Runs in the factors' dtype (fp32).
    """
    active = [isinstance(m, _LoRALayer) and not m.merged for m in layers]
    if not any(active):
        return None
    lora = next(m for m, on in zip(layers, active, strict=True) if on)
    dtype, lead = lora.lora_down.weight.dtype, x.shape[:-1]
    if any(
        on and (isinstance(m, _DoRA) or (m.training and isinstance(m.dropout, nn.Dropout)))
        for m, on in zip(layers, active, strict=True)
    ):  # one by one; a DoRA term also recomputes its own W x
        parts = [
            (m.dora_forward(x) if isinstance(m, _DoRA) else m.lora_forward(x))
            if on
            else x.new_zeros(*lead, m.weight.shape[0], dtype=dtype)
            for m, on in zip(layers, active, strict=True)
        ]
        return torch.cat(parts, dim=-1)
    downs, ups = [], []
    for m, on in zip(layers, active, strict=True):
        if on:
            downs.append(m.lora_down.weight)  # (r, in)
            ups.append(m.lora_up.weight * (m.alpha * (m.multiplier / m.rank)))  # (out, r)
        else:
            ups.append(x.new_zeros(m.weight.shape[0], 0, dtype=dtype))
    h = F.linear(x.to(dtype), torch.cat(downs))  # (..., sum of r)
    return F.linear(h, torch.block_diag(*ups))  # (..., sum of out)


class _LinearFactor(nn.Linear):
    """nn.Linear without the random init: LoRA factors are initialised explicitly."""

    def reset_parameters(self) -> None:
        pass


class _ConvFactor(nn.Conv2d):
    """nn.Conv2d without the random init: LoRA factors are initialised explicitly."""

    def reset_parameters(self) -> None:
        pass


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    return layer


def _adopt(plain: nn.Module, lora: _LoRALayer) -> nn.Module:
    plain.weight = lora.weight
    plain.register_parameter("bias", lora.bias)
    return plain


@torch.no_grad()
def _init_down(layer: _LoRALayer, generator: torch.Generator | None) -> None:
    """Kaiming-uniform `lora_down` like nn.Linear/PEFT: U(+-1/sqrt(fan_in)); drawn on the CPU."""
    w = layer.lora_down.weight
    if w.is_meta:
        return
    bound = 1.0 / math.sqrt(w[0].numel())
    w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=generator))


def _wrap(
    module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False
) -> _LoRALayer:
    if isinstance(module, nn.Linear):
        return (DoRALinear if dora else LoRALinear)(module, rank, alpha, dropout)
    if isinstance(module, nn.Conv2d):
        return (DoRAConv2d if dora else LoRAConv2d)(module, rank, alpha, dropout)
    raise ValueError(f"LoRA needs an nn.Linear or nn.Conv2d, got {type(module).__name__}")


# ----------------------------------------------------------------------------- injection


def lora_modules(model: nn.Module) -> dict[str, LoRAModule]:
    """The model's LoRA layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LoRALayer)}


def _targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """Module path -> base Linear/Conv2d the config selects."""
    named = config.target if not isinstance(config.target, str) else None
    patterns = [re.compile(p) for p in (named or _TARGET_PATTERNS[config.target])]
    conv_patterns = [re.compile(p) for p in _CONV_PATTERNS] if config.conv else []
    out = {}
    for name, m in model.named_modules():
        hit = isinstance(m, nn.Linear | nn.Conv2d) and any(p.search(name) for p in patterns)
        conv_hit = isinstance(m, nn.Conv2d) and any(p.search(name) for p in conv_patterns)
        if hit or conv_hit:
            out[name] = m
    return out


def _ensure_no_lora(model: nn.Module) -> None:
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers; call remove_lora(model) first")


def inject_lora(
    model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None
) -> dict[str, LoRAModule]:
    """Replace the targeted layers by LoRA layers (up = 0: output unchanged) for training.

    Freezes every base parameter; only the LoRA factors require grad. `generator` (CPU) seeds
    lora_down. Returns the LoRA layers by module path.
    """
    _ensure_no_lora(model)
    targets = _targets(model, config)
    if not targets:
        raise ValueError(f"LoRA target {config.target!r} matched no Linear/Conv2d module")
    model.requires_grad_(False)
    layers = {}
    for name, module in targets.items():
        rank, alpha = config.rank_alpha(module)
        layer = _wrap(module, rank, alpha, config.dropout, config.dora)
        _init_down(layer, generator)
        model.set_submodule(name, layer)
        layers[name] = layer
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors to optimise; raises unless there are some and all are fp32."""
    params = [
        p for m in lora_modules(model).values() for p in (m.lora_down.weight, m.lora_up.weight)
    ]
    params += [m.dora_scale for m in lora_modules(model).values() if isinstance(m, _DoRA)]
    if not params:
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if bad:
        raise ValueError(
            f"LoRA parameters are {bad}, not fp32 (was the model cast after inject_lora?); "
            "cast the base model first, then inject"
        )
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our LoRA state: <path>.lora_down.weight, .lora_up.weight, .alpha (+ DoRA's .dora_scale)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
        state[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
        state[f"{name}.alpha"] = m.alpha.detach()
        if isinstance(m, _DoRA):
            state[f"{name}.dora_scale"] = m.dora_scale.detach()
    if not state:
        raise ValueError("the model has no LoRA layers")
    return state


class LoRAWeights(NamedTuple):
    """One module's LoRA: down (r, in[, k, k]), up (out, r[, 1, 1]), alpha; DoRA's magnitude.

    magnitude: DoRA's `dora_scale` (out, 1[, 1, 1]), or None for a plain LoRA.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """(alpha / r) * up @ down in fp32, shaped (out, in[, k, k]) (for DoRA: before the norm)."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return d.view(self.up.shape[0], *self.down.shape[1:]) * (self.alpha / self.rank)


def split_lora_state(state: Mapping[str, torch.Tensor]) -> dict[str, LoRAWeights]:
    """Group our LoRA state by module path, checking the keys and shapes (missing alpha = rank)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"LoRA state key {key!r} does not end in one of {list(_SUFFIXES)}")
        parts.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    out = {}
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise ValueError(f"LoRA module {name!r} needs both lora_down.weight and lora_up.weight")
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        _check_pair(name, down, up)
        alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])
        magnitude = _magnitude(name, p["dora_scale"], up) if "dora_scale" in p else None
        out[name] = LoRAWeights(down, up, alpha, magnitude)
    return out


def _magnitude(name: str, scale: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """DoRA's dora_scale as (out, 1[, 1, 1]); (out,) (peft) and (out, 1, ...) (LyCORIS) accepted."""
    out = up.shape[0]
    if scale.numel() != out or (scale.ndim > 1 and scale.shape[0] != out):
        raise ValueError(
            f"LoRA module {name!r}: dora_scale {tuple(scale.shape)} is not one magnitude per "
            f"output row ({out}); input-axis DoRA (LyCORIS wd_on_output=False) is not supported"
        )
    return scale.reshape(out, *[1] * (up.ndim - 1))


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    shapes = f"down {tuple(down.shape)}, up {tuple(up.shape)}"
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise ValueError(f"LoRA module {name!r} has inconsistent shapes: {shapes}")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise ValueError(f"LoRA module {name!r}: conv lora_up must be 1x1, got {shapes}")


def check_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, LoRAWeights]:
    """Check that every LoRA module exists in `model` with matching shapes; return it split."""
    weights = split_lora_state(state)
    modules = dict(model.named_modules())
    for name, w in weights.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear | nn.Conv2d | _LoRALayer):
            kind = "does not exist" if m is None else f"is a {type(m).__name__}"
            raise ValueError(f"LoRA module {name!r} {kind} in this model (not a Linear/Conv2d)")
        wanted = tuple(m.weight.shape)
        got = (w.up.shape[0], *w.down.shape[1:])
        if got != wanted:
            raise ValueError(
                f"LoRA module {name!r} has down {tuple(w.down.shape)} / up {tuple(w.up.shape)}, "
                f"which make a {got} delta, but the model's weight is {wanted}"
            )
    return weights


def load_lora_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy a LoRA state into the injected LoRA layers (e.g. to resume training).

    Keys for modules without a LoRA layer always raise; with strict, so do LoRA layers the
    state does not cover.
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    weights = split_lora_state(state)
    unexpected = sorted(set(weights) - set(layers))
    missing = sorted(set(layers) - set(weights))
    if unexpected or (strict and missing):
        raise ValueError(
            f"LoRA state does not match the injected layers: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, w in weights.items():
        _copy_weights(name, layers[name], w)


@torch.no_grad()
def _copy_weights(name: str, layer: _LoRALayer, w: LoRAWeights) -> None:
    if layer.merged:
        raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora first")
    for param, value in ((layer.lora_down.weight, w.down), (layer.lora_up.weight, w.up)):
        if param.shape != value.shape:
            raise ValueError(
                f"LoRA module {name!r}: state has {tuple(value.shape)}, layer has {tuple(param.shape)}"
            )
        param.copy_(value)
    layer.alpha.fill_(w.alpha)
    if isinstance(layer, _DoRA) != (w.magnitude is not None):
        kinds = ("DoRA", "plain LoRA") if w.magnitude is None else ("plain LoRA", "DoRA")
        raise ValueError(f"LoRA module {name!r}: the layer is {kinds[0]}, the state is {kinds[1]}")
    if w.magnitude is not None:
        layer.dora_scale.copy_(w.magnitude)


def remove_lora(model: nn.Module, bake: bool = False) -> None:
    """Put plain Linear/Conv2d back; with bake the LoRA effect stays in the weights, else not."""
    for name, layer in lora_modules(model).items():
        if bake and not layer.merged:
            layer.merge()
        elif not bake:
            layer.unmerge()
        model.set_submodule(name, layer.to_base())


def set_lora_multiplier(model: nn.Module, multiplier: float) -> None:
    """Scale every LoRA's effect (0 = off) for the unmerged forward."""
    for name, layer in lora_modules(model).items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora first")
        layer.multiplier = float(multiplier)


def merge_lora(model: nn.Module, multiplier: float | None = None) -> None:
    """Merge every LoRA into its base weight for inference (fp32 maths, then cast).

    multiplier: the strength to merge at (default: each layer's current multiplier, 1.0).
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    if multiplier is not None:
        set_lora_multiplier(model, multiplier)
    for layer in layers.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: restore the base weights (within rounding for bf16/fp16 bases)."""
    for layer in lora_modules(model).values():
        layer.unmerge()


def apply_loras(
    model: nn.Module,
    loras: Iterable[tuple[Mapping[str, torch.Tensor], float]],
    merge: bool = False,
) -> dict[str, LoRAModule]:
    """Apply several LoRA states for inference, each with its multiplier; optionally merged.

    A module that several LoRAs touch gets one LoRA layer whose factors are the LoRAs' factors
    stacked along the rank (up columns pre-scaled by multiplier * alpha / r), which computes
    the exact sum of their deltas. A DoRA LoRA gets a DoRA layer with its multiplier; it cannot
    share a module with another LoRA. LoRA factors do not require grad.
    """
    _ensure_no_lora(model)
    per_module: dict[str, list[tuple[LoRAWeights, float]]] = {}
    for state, multiplier in loras:
        for name, w in check_lora_state(model, state).items():
            per_module.setdefault(name, []).append((w, float(multiplier)))
    if not per_module:
        raise ValueError("apply_loras needs at least one LoRA")
    for name, ws in per_module.items():
        if len(ws) > 1 and any(w.magnitude is not None for w, _ in ws):
            raise ValueError(
                f"LoRA module {name!r}: a DoRA LoRA (dora_scale) cannot be stacked with other "
                "LoRAs on the same module (DoRA renormalises the whole weight, so the result "
                "depends on the order); apply the DoRA LoRA alone"
            )
    layers = {name: _combined_layer(model, name, ws) for name, ws in per_module.items()}
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    if merge:
        merge_lora(model)
    return layers


@torch.no_grad()
def _combined_layer(model: nn.Module, name: str, ws: list[tuple[LoRAWeights, float]]) -> _LoRALayer:
    """One LoRA layer equal to the multiplier-weighted sum of the given LoRAs."""
    if ws[0][0].magnitude is not None:  # DoRA, alone (apply_loras checks)
        return _dora_layer(model, name, *ws[0])
    if len(ws) == 1:
        w, m = ws[0]
        down, up, alpha = w.down, w.up.float() * m, w.alpha
    else:
        down = torch.cat([w.down.float() for w, _ in ws])  # (sum r, in[, k, k])
        up = torch.cat([w.up.float() * (m * w.alpha / w.rank) for w, m in ws], dim=1)
        alpha = float(down.shape[0])  # scale 1: the scales are in `up`
    layer = _wrap(model.get_submodule(name), down.shape[0], alpha)
    layer.lora_down.weight.copy_(down)
    layer.lora_up.weight.copy_(up)
    layer.lora_down.requires_grad_(False)
    layer.lora_up.requires_grad_(False)
    return layer


@torch.no_grad()
def _dora_layer(model: nn.Module, name: str, w: LoRAWeights, multiplier: float) -> _DoRA:
    """A frozen DoRA layer holding one DoRA LoRA, at `multiplier`."""
    layer = _wrap(model.get_submodule(name), w.rank, w.alpha, dora=True)
    _copy_weights(name, layer, w)
    layer.multiplier = multiplier
    for p in (layer.lora_down.weight, layer.lora_up.weight, layer.dora_scale):
        p.requires_grad_(False)
    return layer
