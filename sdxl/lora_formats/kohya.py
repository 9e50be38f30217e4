"""kohya's SDXL LoRA `.safetensors` (ComfyUI, A1111 and diffusers load it): tensors, header, hashes.

Keys: `lora_unet_<SGM path, '.'->'_'>` (or `lora_te1_`/`lora_te2_<CLIP path>`) + `.lora_down.weight`
/ `.lora_up.weight` / `.alpha` (+ `.dora_scale` for DoRA); SDXL metadata in the header.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from sdxl.lora import split_lora_state
from sdxl.lora_formats.layout import SDXL_LAYOUT, UNetLayout, diffusers_to_sgm, sgm_to_diffusers
from sdxl.lora_formats.state import most_common_rank_alpha, to_cpu, with_alphas
from sdxl.text_lora import component_of, kohya_text_name, kohya_text_path
from sdxl.utils import atomic_path

_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_TEXT_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")
# Identifiers with "_" in SGM or diffusers UNet module paths (kohya turns every "." into "_").
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
        out[f"{name}.lora_down.weight"] = to_cpu(w.down, dtype)
        out[f"{name}.lora_up.weight"] = to_cpu(w.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.magnitude is not None:  # DoRA, LyCORIS layout (out, 1[, 1, 1]); fp32 like alpha
            out[f"{name}.dora_scale"] = to_cpu(w.magnitude, torch.float32)
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
    return with_alphas(state), tuple(sorted(text))


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
    dim, alpha = most_common_rank_alpha(linear or conv)
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
        conv_dim, conv_alpha = most_common_rank_alpha(conv)
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
    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header_len :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


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
