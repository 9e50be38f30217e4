"""LoRA files: kohya (SGM names), the seed's .pt and diffusers/PEFT, to and from our LoRA state.

Our state (`sdxl.lora.lora_state_dict`) is keyed by diffusers module path: `<path>.lora_down.weight`
[r, in(, k, k)], `<path>.lora_up.weight` [out, r(, 1, 1)], `<path>.alpha`; delta = alpha/r up@down.

* kohya `.safetensors` (what ComfyUI, A1111 and diffusers load): `lora_unet_<SGM path, '.'->'_'>`
  + `.lora_down.weight` / `.lora_up.weight` / `.alpha`, SDXL metadata in the header.
* the seed's `.pt`: {"lora_state_dict": {"<path>.lora_layer.lora_A": [in, r],
  "<path>.lora_layer.lora_B": [r, out]}, "config": {"lora_rank", "lora_alpha", ...}, ...};
  one scale alpha/r for every module, Linear only.
* diffusers/PEFT `pytorch_lora_weights.safetensors`: `unet.<path>.lora_A.weight` / `.lora_B.weight`;
  alpha in the `lora_adapter_metadata` header (PEFT LoraConfig JSON), else alpha = r.

Each format has one pure conversion pair (state <-> tensors); `load_lora_file` detects the format.
The UNet diffusers <-> SGM module map is `sdxl.convert.unet_key_map` of the block layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sdxl.convert import unet_key_map
from sdxl.lora import LoRAWeights, check_lora_state, split_lora_state
from sdxl.models.configs import SDXL_BASE
from sdxl.text_lora import component_of, kohya_text_name, kohya_text_path
from sdxl.utils import atomic_path, to_dtype

# ----------------------------------------------------------------------------- UNet layout + map


@dataclass(frozen=True)
class UNetLayout:
    """The UNet block structure the diffusers <-> SGM block numbering depends on."""

    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]  # per level, top first

    @classmethod
    def from_config(cls, config: Mapping | object) -> UNetLayout:
        """From a diffusers UNet config dict or an object with the same attributes (UNetConfig)."""

        def get(key):
            return config[key] if isinstance(config, Mapping) else getattr(config, key)

        downs, ups, layers = (
            get(k) for k in ("down_block_types", "up_block_types", "layers_per_block")
        )
        layers = (layers,) * len(downs) if isinstance(layers, int) else layers
        return cls(tuple(downs), tuple(ups), tuple(layers))

    @classmethod
    def from_module_names(cls, names: list[str]) -> UNetLayout:
        """Infer the layout from a UNet's module paths (diffusers naming)."""
        found = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)$")
        resnets: Counter[tuple[str, int]] = Counter()
        attends: set[tuple[str, int]] = set()
        for name in names:
            m = found.search(name)
            if m and m[3] == "resnets":
                resnets[m[1], int(m[2])] += 1
            elif m:
                attends.add((m[1], int(m[2])))
        n = sum(1 for side, _ in resnets if side == "down")
        if n == 0:
            raise ValueError("no down_blocks.N.resnets.M modules: not a diffusers-named UNet")
        return cls(
            tuple(
                "CrossAttnDownBlock2D" if ("down", b) in attends else "DownBlock2D"
                for b in range(n)
            ),
            tuple("CrossAttnUpBlock2D" if ("up", b) in attends else "UpBlock2D" for b in range(n)),
            tuple(resnets["down", b] for b in range(n)),
        )

    def config(self) -> dict:
        """The diffusers config keys `sdxl.convert.unet_key_map` reads."""
        return {k: list(v) for k, v in asdict(self).items()}


SDXL_LAYOUT = UNetLayout.from_config(SDXL_BASE["unet"])


@functools.cache
def _key_maps(layout: UNetLayout) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers -> SGM module prefixes (from sdxl.convert) and the inverse."""
    table = unet_key_map(layout.config())
    return table, {v: k for k, v in table.items()}


def _rename_module(path: str, table: dict[str, str]) -> str:
    """Rename `path` by its longest dotted prefix in `table` (transformer insides keep names)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    raise ValueError(f"{path!r} is not a module of this UNet (or of this UNet layout)")


def diffusers_to_sgm(path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """SGM (Stability/kohya) module path of a diffusers UNet module path."""
    return _rename_module(path, _key_maps(layout)[0])


def sgm_to_diffusers(path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """Diffusers module path of an SGM UNet module path (inverse of diffusers_to_sgm)."""
    return _rename_module(path, _key_maps(layout)[1])


# ----------------------------------------------------------------------------- kohya

_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_TEXT_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")
# Identifiers that contain "_" in SGM or diffusers UNet module paths (kohya turns every "." into "_").
_WORDS = frozenset(
    [
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "down_blocks",
        "mid_block",
        "up_blocks",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "time_emb_proj",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
    ]
)
_SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def kohya_name_to_path(name: str) -> str:
    """Dotted module path of a kohya name (no prefix): re-join identifiers that contain '_'."""
    tokens, out, i = name.split("_"), [], 0
    while i < len(tokens):
        n = next(n for n in (3, 2, 1) if n == 1 or "_".join(tokens[i : i + n]) in _WORDS)
        out.append("_".join(tokens[i : i + n]))
        i += n
    return ".".join(out)


def state_to_kohya(
    state: Mapping[str, torch.Tensor],
    layout: UNetLayout = SDXL_LAYOUT,
    dtype: torch.dtype | str | None = None,
) -> dict[str, torch.Tensor]:
    """Kohya tensors: lora_unet_<SGM path with '_'>.{lora_down.weight, lora_up.weight, alpha}."""
    out = {}
    for path, w in split_lora_state(state).items():
        name = _kohya_name(path, layout)
        out[f"{name}.lora_down.weight"] = _cpu(w.down, dtype)
        out[f"{name}.lora_up.weight"] = _cpu(w.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.magnitude is not None:  # DoRA, LyCORIS layout (out, 1[, 1, 1]); fp32 like alpha
            out[f"{name}.dora_scale"] = _cpu(w.magnitude, torch.float32)
    return out


def kohya_to_state(
    tensors: Mapping[str, torch.Tensor], layout: UNetLayout = SDXL_LAYOUT
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Our state from kohya tensors (SGM or diffusers module names); also the text-encoder names.

    kohya's CLIP modules (lora_te1_/lora_te2_) are in the state as `text_encoder[_2].<path>`.
    """
    state, text = {}, set()
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in _KOHYA_SUFFIXES:
            raise ValueError(
                f"unsupported tensor {key!r}: only lora_down.weight, lora_up.weight, alpha and "
                "dora_scale are supported (not LoHa/LoKr/other LyCORIS variants)"
            )
        if name.startswith(_TEXT_PREFIXES):
            text.add(name)
            te_path = kohya_text_path(name)  # None: not a CLIP target kohya trains (kept out)
            if te_path is not None:
                state[f"{te_path}.{suffix}"] = value
            continue
        if not name.startswith("lora_unet_"):
            raise ValueError(f"tensor {key!r} is neither lora_unet_* nor lora_te*_*")
        state[f"{_kohya_unet_path(name, layout)}.{suffix}"] = value
    return _with_alphas(state), tuple(sorted(text))


def _kohya_name(path: str, layout: UNetLayout) -> str:
    """kohya's module name: lora_unet_<SGM path>, or lora_te1_/lora_te2_<CLIP path>."""
    if component_of(path) != "unet":
        return kohya_text_name(path)
    return "lora_unet_" + diffusers_to_sgm(path, layout).replace(".", "_")


def _kohya_unet_path(name: str, layout: UNetLayout) -> str:
    path = kohya_name_to_path(name.removeprefix("lora_unet_"))
    if path.split(".")[0] in _SGM_ROOTS:
        return sgm_to_diffusers(path, layout)
    diffusers_to_sgm(path, layout)  # raises unless it is a module of this layout
    return path


def _with_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise: every module gets an explicit fp32 alpha (missing = rank)."""
    out = {}
    for path, w in split_lora_state(state).items():
        out[f"{path}.lora_down.weight"] = w.down
        out[f"{path}.lora_up.weight"] = w.up
        out[f"{path}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.magnitude is not None:
            out[f"{path}.dora_scale"] = w.magnitude
    return out


def _cpu(t: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    dtype = to_dtype(dtype) if dtype is not None else t.dtype
    return t.detach().to("cpu", dtype).contiguous()


def kohya_metadata(
    state: Mapping[str, torch.Tensor],
    extra: Mapping[str, str] | None = None,
    title: str = "",
    *,
    resolution: int | tuple[int, int] = 1024,
    prediction_type: str = "epsilon",
) -> dict[str, str]:
    """The SDXL header kohya writes (all strings), updated with `extra`.

    `resolution` (the training size, px) and `prediction_type` ('epsilon' or 'v_prediction')
    describe the run, so UIs show the truth (modelspec.resolution, modelspec.prediction_type,
    ss_v_parameterization).
    """
    weights = split_lora_state(state)
    linear, conv = [], []
    for w in weights.values():
        (linear if w.down.ndim == 2 or w.down.shape[2:] == (1, 1) else conv).append(w)
    dim, alpha = _most_common(linear or conv)
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    args = {}
    if conv:
        conv_dim, conv_alpha = _most_common(conv)
        args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    if any(w.magnitude is not None for w in weights.values()):
        # DoRA is LyCORIS's `dora_wd` (output-axis magnitudes): what kohya writes for it.
        meta["ss_network_module"] = "lycoris.kohya"
        args = {"algo": "locon" if conv else "lora", **args, "dora_wd": "True"}
        args["wd_on_output"] = "True"
    if args:
        meta["ss_network_args"] = json.dumps(args)
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise ValueError(f"LoRA metadata {key!r} must be a string, got {type(value).__name__}")
        meta[key] = value
    return meta


def safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, str]:
    """The hashes kohya's sd-scripts store, which A1111 and its additional-networks show.

    - `sshs_model_hash`: sha256 (hex) of the tensor data of the .safetensors file, i.e.
      everything after the JSON header, so editing the header leaves it unchanged (the
      "addnet hash" that A1111 reads from this key instead of hashing the file itself).
    - `sshs_legacy_hash`: the first 8 hex of sha256 of the bytes 0x100000..0x110000 of the
      file as kohya serialises it (only its ss_* metadata in the header): the old addnet hash.
    Computed as kohya's `precalculate_safetensors_hashes` does.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header_len :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def _most_common(weights: list[LoRAWeights]) -> tuple[int, float]:
    return Counter((w.rank, w.alpha) for w in weights).most_common(1)[0][0]


# ----------------------------------------------------------------------------- the seed's .pt


def state_to_seed(state: Mapping[str, torch.Tensor]) -> dict:
    """The seed's LoRA checkpoint layout (without optimizer), which its generate_images.py loads.

    The seed uses one alpha/r for all modules: other scales are folded into lora_B.
    """
    weights = split_lora_state(state)
    if any(w.down.ndim != 2 for w in weights.values()):
        raise ValueError("the seed's .pt format holds Linear LoRAs only; save conv LoRAs as kohya")
    rank, alpha = _most_common(list(weights.values()))
    scale = alpha / rank
    tensors = {}
    for path, w in weights.items():
        tensors[f"{path}.lora_layer.lora_A"] = _cpu(w.down, torch.float32).T.contiguous()
        up = w.up.float() * (w.alpha / w.rank / scale)
        tensors[f"{path}.lora_layer.lora_B"] = _cpu(up, torch.float32).T.contiguous()
        if w.magnitude is not None:  # DoRA: an addition the seed's own loader does not know
            tensors[f"{path}.lora_layer.dora_scale"] = _cpu(w.magnitude, torch.float32)
    config = {"lora_rank": rank, "lora_alpha": alpha, "lora_target_mode": _seed_mode(weights)}
    return {
        "lora_state_dict": tensors,
        "config": config,
        "checkpoint_version": "1.0",
        "is_lora_checkpoint": True,
    }


def _seed_mode(weights: Mapping[str, LoRAWeights]) -> str:
    """The seed's --lora_target_mode that covers these modules."""
    if all(re.search(r"attn[12]\.to_[qkv]$", p) for p in weights):
        return "attention"
    if all(re.search(r"attn[12]\.(to_[qkv]|to_out\.0)$", p) for p in weights):
        return "attention_out"
    return "all"


def seed_to_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Our state from a seed .pt dict (training checkpoint or extract_lora_weights.py output)."""
    tensors = checkpoint.get("lora_state_dict")
    config = checkpoint.get("config") or checkpoint.get("metadata") or {}
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("no 'lora_state_dict' with tensors in this seed checkpoint")
    if "lora_alpha" not in config or "lora_rank" not in config:
        raise ValueError("the seed checkpoint has no config with lora_rank and lora_alpha")
    scale = float(config["lora_alpha"]) / int(config["lora_rank"])
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_layer\.(?:lora_([AB])|(dora_scale))", key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in the seed's lora_state_dict")
        parts.setdefault(m[1], {})[m[2] or m[3]] = value
    state = {}
    for path, p in parts.items():
        if set(p) - {"dora_scale"} != {"A", "B"}:
            raise ValueError(f"seed LoRA module {path!r} needs both lora_A and lora_B")
        down, up = p["A"].float().T.contiguous(), p["B"].float().T.contiguous()  # (r, in), (out, r)
        state[f"{path}.lora_down.weight"], state[f"{path}.lora_up.weight"] = down, up
        state[f"{path}.alpha"] = torch.tensor(scale * down.shape[0])
        if "dora_scale" in p:
            state[f"{path}.dora_scale"] = p["dora_scale"]
    return state


# ----------------------------------------------------------------------------- diffusers / PEFT

_PEFT_KEY = re.compile(
    r"(?P<path>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<du>down|up)\.weight|(?P<alpha>alpha))"
)
_PEFT_PROCESSOR_KEY = re.compile(
    r"(?P<pre>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<du>down|up)\.weight"
)
_PEFT_TEXT = ("text_encoder.", "text_encoder_2.")
_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def state_to_peft(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers `save_lora_weights` tensors (unet.<path>.lora_A/B.weight) and header metadata."""
    weights = split_lora_state(state)
    if any(w.magnitude is not None for w in weights.values()):
        raise ValueError("DoRA LoRAs are written as kohya .safetensors (dora_scale), not as PEFT")
    tensors = {}
    for path, w in weights.items():
        tensors[f"unet.{path}.lora_A.weight"] = _cpu(w.down, None)
        tensors[f"unet.{path}.lora_B.weight"] = _cpu(w.up, None)
    rank, alpha = _most_common(list(weights.values()))
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {p: w.rank for p, w in weights.items() if w.rank != rank},
        "alpha_pattern": {p: w.alpha for p, w in weights.items() if w.alpha != alpha},
        "target_modules": sorted(weights),
    }
    packed = {f"unet.{k}": v for k, v in config.items()}
    return tensors, {
        "format": "pt",
        _ADAPTER_METADATA: json.dumps(packed, indent=2, sort_keys=True),
    }


def peft_to_state(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Our state from diffusers/PEFT tensors (+ header); also the text-encoder module names.

    Text-encoder modules in PEFT's layout are in the state as `text_encoder[_2].<path>`.
    """
    state, text, alphas = {}, set(), {}
    for key, value in tensors.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith(_PEFT_TEXT):
            component, rest = key.split(".", 1)
            try:
                path, part = _peft_key(rest)
            except ValueError:  # an older layout (lora_linear_layer): not applied
                text.add(key.rsplit(".lora", 1)[0])
                continue
            # transformers >= 5 names a bare CLIPTextModel's modules without `text_model.`
            path = f"{component}.{path if path.startswith('text_') else 'text_model.' + path}"
            text.add(path)
        else:
            path, part = _peft_key(key.removeprefix("unet."))
        if part == "alpha":
            alphas[path] = float(value)
        else:
            state[f"{path}.{part}"] = value
    configs = {"unet": _peft_config(metadata)}
    for path, w in split_lora_state(state).items():
        part = component_of(path)
        if part not in configs:
            configs[part] = _peft_text_config(metadata, part)
        config, bare = configs[part], path if part == "unet" else path.split(".", 1)[1]
        alpha = alphas.get(
            path, _pattern_value(config, "alpha_pattern", bare, config.get("lora_alpha"))
        )
        alpha = float(alpha) if alpha is not None else float(w.rank)
        if config.get("use_rslora"):
            alpha *= w.rank**0.5  # rsLoRA scales by alpha / sqrt(r)
        state[f"{path}.alpha"] = torch.tensor(alpha)
    return state, tuple(sorted(text))


def _peft_key(key: str) -> tuple[str, str]:
    """(module path, our suffix) of one PEFT/diffusers LoRA key."""
    m = _PEFT_PROCESSOR_KEY.fullmatch(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['pre']}.{proj}", f"lora_{m['du']}.weight"
    m = _PEFT_KEY.fullmatch(key)
    if not m:
        raise ValueError(
            f"unsupported tensor {key!r}: expected <module>.lora_A.weight / lora_B.weight "
            "(DoRA and other PEFT variants are not supported)"
        )
    if m["alpha"]:
        return m["path"], "alpha"
    down = m["ab"] == "A" or m["du"] == "down"
    return m["path"], "lora_down.weight" if down else "lora_up.weight"


def _peft_config(metadata: Mapping[str, str] | None) -> dict:
    """The UNet's PEFT LoraConfig fields from diffusers' lora_adapter_metadata header, if any."""
    raw = (metadata or {}).get(_ADAPTER_METADATA)
    if not raw:
        return {}
    packed = json.loads(raw)
    config = {k.removeprefix("unet."): v for k, v in packed.items() if not k.startswith(_PEFT_TEXT)}
    if config.get("use_dora"):
        raise ValueError("DoRA LoRAs (use_dora) are not supported")
    return config


def _peft_text_config(metadata: Mapping[str, str] | None, component: str) -> dict:
    """A text encoder's PEFT LoraConfig fields (`<component>.` keys of the adapter metadata)."""
    packed = json.loads((metadata or {}).get(_ADAPTER_METADATA) or "{}")
    return {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(f"{component}.")}


def _pattern_value(config: Mapping, key: str, path: str, default):
    """PEFT's rank/alpha_pattern lookup: first pattern matching the end of the module path."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class LoRAInfo:
    """What a LoRA file held besides the tensors."""

    format: str  # "kohya", "seed", "peft" or "sdxl" (our state saved as is)
    ranks: dict[str, int]
    alphas: dict[str, float]
    metadata: dict[str, str]
    ignored: tuple[str, ...] = ()  # text-encoder modules in the file, not applied

    @property
    def rank(self) -> int:
        """The most common rank."""
        return Counter(self.ranks.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        """The most common alpha."""
        return Counter(self.alphas.values()).most_common(1)[0][0]


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used for this UNet (the message names the file)."""


def load_lora_file(
    path: str | os.PathLike, unet: nn.Module | None = None, *, text_encoders: bool = False
) -> tuple[dict[str, torch.Tensor], LoRAInfo]:
    """Read a kohya, seed .pt, diffusers/PEFT or our own LoRA file into our state (format detected).

    With `unet`, its module names give the block layout and every UNet LoRA module is checked to
    exist with matching shapes; without, the SDXL layout is assumed. Text-encoder parts are
    skipped with a warning, unless `text_encoders`: then they are in the state too, keyed
    `text_encoder.<path>` / `text_encoder_2.<path>` (see `sdxl.text_lora.apply_component_loras`),
    and a file with only those is usable. Files for other architectures raise LoRAFileError
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        obj, metadata = _read(path)
        _check_architecture(metadata)
        layout = (
            UNetLayout.from_module_names([n for n, _ in unet.named_modules()]) if unet else None
        )
        state, fmt, ignored = _to_state(obj, metadata, layout or SDXL_LAYOUT)
        state, ignored = _text_parts(state, ignored, text_encoders)
        if not state:
            what = (
                f"only text-encoder LoRA weights ({len(ignored)} modules)" if ignored else "no LoRA"
            )
            raise ValueError(f"it has {what}; only UNet LoRAs are applied")
        if unet is not None:
            check_lora_state(unet, {k: v for k, v in state.items() if component_of(k) == "unet"})
    except (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise LoRAFileError(f"{path}: not a usable SDXL UNet LoRA: {e}") from e
    if ignored:
        why = " (not CLIP attention/MLP Linears)" if text_encoders else "; only the UNet is applied"
        warnings.warn(f"{path}: skipping {len(ignored)} text-encoder LoRA modules{why}",
                      stacklevel=2)  # fmt: skip
    weights = split_lora_state(state)
    ranks = {p: w.rank for p, w in weights.items()}
    alphas = {p: w.alpha for p, w in weights.items()}
    return state, LoRAInfo(fmt, ranks, alphas, dict(metadata), ignored)


def _text_parts(
    state: dict[str, torch.Tensor], ignored: tuple[str, ...], keep: bool
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state with its text-encoder parts kept or dropped; the text modules not applied."""
    if not keep:
        return {k: v for k, v in state.items() if component_of(k) == "unet"}, ignored
    # Names of modules not converted (kohya: not CLIP q/k/v/out_proj or fc1/fc2, e.g. SD 1.x
    # lora_te_; PEFT: an older layout) stay out.
    modules = set(split_lora_state(state))
    paths = {n: kohya_text_path(n) if n.startswith("lora_te") else n for n in ignored}
    return state, tuple(n for n, path in paths.items() if path not in modules)


def _read(path: Path) -> tuple[Mapping, dict[str, str]]:
    """Tensors (or the seed's checkpoint dict) and the safetensors header metadata."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read the safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never
        raise ValueError(
            "it is a pickle holding objects other than tensors, refused because loading it "
            "could run code; use a .safetensors LoRA"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict, found a {type(obj).__name__}")
    return obj, {}


def _check_architecture(metadata: Mapping[str, str]) -> None:
    """Reject files whose header says they are for another model."""
    base = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if base and not base.startswith("sdxl"):
        raise ValueError(f"it was trained for {base!r} (ss_base_model_version), not SDXL")
    if arch and not arch.startswith("stable-diffusion-xl"):
        raise ValueError(f"it is for {arch!r} (modelspec.architecture), not SDXL")
    if metadata.get("ss_v2") == "True":
        raise ValueError("it was trained for Stable Diffusion 2.x (ss_v2), not SDXL")


def _to_state(
    obj: Mapping, metadata: Mapping[str, str], layout: UNetLayout
) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """(our state, format name, skipped text-encoder modules) for any supported set of keys."""
    if "lora_state_dict" in obj:
        return seed_to_state(obj), "seed", ()
    keys = list(obj)
    if any(not isinstance(obj[k], torch.Tensor) for k in keys):
        raise ValueError("it holds non-tensor entries and no 'lora_state_dict'")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        state, ignored = kohya_to_state(obj, layout)
        return state, "kohya", ignored
    if any(".lora_layer.lora_" in k for k in keys):
        raise ValueError("it has bare seed lora_layer tensors without the seed's lora_alpha config")
    if any(k.endswith(".lora_down.weight") for k in keys):
        state = _with_alphas(dict(obj))
        for path in split_lora_state(state):
            if component_of(path) == "unet":
                diffusers_to_sgm(path, layout)  # raises unless it is a module of this layout
        return state, "sdxl", ()
    if any(_PEFT_KEY.fullmatch(k) or _PEFT_PROCESSOR_KEY.fullmatch(k) for k in keys):
        state, ignored = peft_to_state(obj, metadata)
        for path in split_lora_state(state):
            if component_of(path) == "unet":
                diffusers_to_sgm(path, layout)
        return state, "peft", ignored
    raise ValueError(f"its keys match no known LoRA format (first keys: {keys[:3]})")


def save_kohya(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    layout: UNetLayout = SDXL_LAYOUT,
    dtype: torch.dtype | str | None = None,
    **run: object,
) -> None:
    """Write the kohya `.safetensors` ComfyUI/A1111/diffusers load (atomic).

    `metadata` adds to the header; `run` (resolution, prediction_type) goes to kohya_metadata.
    The header always carries the tensors' sshs_model_hash / sshs_legacy_hash.
    """
    tensors = state_to_kohya(state, layout, dtype)
    header = kohya_metadata(state, metadata, title=Path(path).stem, **run)
    header.update(safetensors_hashes(tensors, header))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def save_seed_pt(path: str | os.PathLike, state: Mapping[str, torch.Tensor], **extra) -> None:
    """Write the seed's LoRA .pt (weights only; `extra` adds top-level entries such as step)."""
    with atomic_path(path) as tmp:
        torch.save({**state_to_seed(state), **extra}, tmp)


def save_peft(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> None:
    """Write diffusers' pytorch_lora_weights.safetensors layout (atomic), alphas in the header."""
    tensors, header = state_to_peft(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
