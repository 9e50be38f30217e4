"""Key conversion between the Stability single-file (SGM) layout and the diffusers layout.

Every function is pure: it renames keys (and reshapes/splits the few tensors whose layout
differs) without copying data. The UNet and VAE maps are computed from the component configs,
so the same code converts full SDXL and the tiny test model. Tensors stay views of the input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sdxl.models.configs import SDXL_BASE

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Where each diffusers component lives inside an SGM single file.
SGM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

# SGM buffers that are not weights of our modules (recomputed in forward or unused).
_SGM_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")

_UNET_RESNET = {  # diffusers ResnetBlock2D name -> SGM ResBlock name
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPENCLIP_LAYER = {  # inside text_model.encoder.layers.N <-> transformer.resblocks.N
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


# ----------------------------------------------------------------------------- prefix tables


def _add_resnet(table: dict[str, str], diffusers: str, sgm: str, inner: dict[str, str]) -> None:
    """Map each sub-layer of one resnet block."""
    for d_name, s_name in inner.items():
        table[f"{diffusers}.{d_name}"] = f"{sgm}.{s_name}"


def _has_attention(block_type: str) -> bool:
    """CrossAttnDownBlock2D / CrossAttnUpBlock2D carry transformer blocks."""
    return block_type.startswith("CrossAttn")


def unet_key_map(config: dict) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix for a UNet config (any depth and width).

    With L layers per block: down block b, layer l -> input_blocks.(1 + b(L+1) + l), then its
    downsampler; up blocks have L+1 layers -> output_blocks.(b(L+1) + l), the upsampler after
    the attention of the last one. Per-level `layers_per_block` lists work the same way.
    """
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    layers = config["layers_per_block"]
    down_layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    up_layers = down_layers[::-1]
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    index = 1
    for b, block_type in enumerate(down_types):
        for lay in range(down_layers[b]):
            _add_resnet(
                table, f"down_blocks.{b}.resnets.{lay}", f"input_blocks.{index}.0", _UNET_RESNET
            )
            if _has_attention(block_type):
                table[f"down_blocks.{b}.attentions.{lay}"] = f"input_blocks.{index}.1"
            index += 1
        if b < len(down_types) - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for b, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for lay in range(up_layers[b] + 1):
            _add_resnet(
                table, f"up_blocks.{b}.resnets.{lay}", f"output_blocks.{index}.0", _UNET_RESNET
            )
            if attention:
                table[f"up_blocks.{b}.attentions.{lay}"] = f"output_blocks.{index}.1"
            if lay == up_layers[b] and b < len(up_types) - 1:
                slot = 2 if attention else 1
                table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return table


def vae_key_map(config: dict) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix for an AutoencoderKL config.

    The SGM decoder numbers its levels from the bottom (up.0 is the last to run), diffusers
    from the top, so decoder up block i <-> up.(n-1-i).
    """
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        _add_resnet(table, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _add_resnet(table, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        _add_resnet(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(levels):
        for lay in range(layers):
            _add_resnet(
                table,
                f"encoder.down_blocks.{i}.resnets.{lay}",
                f"encoder.down.{i}.block.{lay}",
                _VAE_RESNET,
            )
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv"
            )
    for i in range(levels):
        sgm = f"decoder.up.{levels - 1 - i}"
        for lay in range(layers + 1):
            _add_resnet(
                table, f"decoder.up_blocks.{i}.resnets.{lay}", f"{sgm}.block.{lay}", _VAE_RESNET
            )
        if i < levels - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"{sgm}.upsample.conv"
    return table


def _invert(table: dict[str, str]) -> dict[str, str]:
    """Reverse a one-to-one prefix table."""
    inverse = {v: k for k, v in table.items()}
    assert len(inverse) == len(table), "prefix table is not one-to-one"
    return inverse


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Rename `key` by its longest dotted prefix found in `table` (None if none matches)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return None


def _rename_all(sd: dict, table: dict[str, str], what: str) -> dict:
    """Rename every key of `sd`; unmapped keys are an error that lists them."""
    out, unknown = {}, []
    for key, value in sd.items():
        new = _rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} {what} key(s) are not part of the SDXL layout, e.g. {unknown[:5]}; "
            "the checkpoint is from another architecture or the config does not match it"
        )
    return out


# ----------------------------------------------------------------------------- components


def unet_to_sgm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel state dict -> SGM keys (without the model prefix)."""
    return _rename_all(sd, unet_key_map(config), "diffusers UNet")


def unet_from_sgm(sd: dict, config: dict) -> dict:
    """SGM UNet state dict (without the model prefix) -> diffusers keys."""
    return _rename_all(sd, _invert(unet_key_map(config)), "SGM UNet")


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    """The mid-block attention projections: Linear in diffusers, 1x1 conv in SGM."""
    return ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith(".weight")


def vae_to_sgm(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> SGM keys; attention Linear (C,C) -> conv (C,C,1,1)."""
    sd = {
        k: v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v
        for k, v in sd.items()
    }
    return _rename_all(sd, vae_key_map(config), "diffusers VAE")


def vae_from_sgm(sd: dict, config: dict) -> dict:
    """SGM VAE state dict -> diffusers keys; attention conv (C,C,1,1) -> Linear (C,C)."""
    out = _rename_all(sd, _invert(vae_key_map(config)), "SGM VAE")
    for key, value in out.items():
        if _is_vae_attention_weight(key) and value.ndim == 4:
            out[key] = value[:, :, 0, 0]
    return out


def with_text_model_prefix(sd: dict) -> dict:
    """Hub layout for CLIP keys: everything but the projection under `text_model.`.

    transformers >= 5.6 saves CLIPTextModel without the prefix; SDXL files have it.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith("text_model.") or key == "text_projection.weight":
            out[key] = value
        else:
            out[f"text_model.{key}"] = value
    return out


def clip_l_to_sgm(sd: dict) -> dict:
    """CLIP-L keeps the transformers names in SGM files (only the file prefix differs)."""
    return {k: v for k, v in with_text_model_prefix(sd).items() if not _ignored(k)}


def clip_l_from_sgm(sd: dict) -> dict:
    """SGM CLIP-L (without the file prefix) -> transformers keys (`text_model.*`)."""
    out = {k: v for k, v in sd.items() if not _ignored(k)}
    bad = [k for k in out if not k.startswith("text_model.")]
    if bad:
        raise ValueError(f"unexpected CLIP-L keys {bad[:5]}; expected text_model.* only")
    return out


def _layer_table(num_layers: int) -> dict[str, str]:
    """transformers CLIP encoder layer prefixes -> OpenCLIP resblock prefixes."""
    table = {}
    for n in range(num_layers):
        for d_name, s_name in _OPENCLIP_LAYER.items():
            table[f"text_model.encoder.layers.{n}.{d_name}"] = f"transformer.resblocks.{n}.{s_name}"
    return table


def openclip_to_sgm(sd: dict, config: dict) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP keys (q,k,v fused, projection (D,P))."""
    sd = {k: v for k, v in with_text_model_prefix(sd).items() if not _ignored(k)}
    out = {_OPENCLIP_TOP[k]: sd.pop(k) for k in list(sd) if k in _OPENCLIP_TOP}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()  # (P,D) -> (D,P)
    for n in range(int(config["num_hidden_layers"])):
        attn = f"text_model.encoder.layers.{n}.self_attn"
        fused = f"transformer.resblocks.{n}.attn.in_proj_"
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{attn}.{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                out[fused + kind] = torch.cat(parts, dim=0)  # (3D, ...)
            elif any(p is not None for p in parts):
                raise ValueError(f"{attn}: q, k and v projections must all be present")
    out.update(_rename_all(sd, _layer_table(int(config["num_hidden_layers"])), "CLIP-bigG"))
    return out


def openclip_from_sgm(sd: dict, config: dict) -> dict:
    """OpenCLIP bigG keys (without the file prefix) -> transformers CLIPTextModelWithProjection."""
    sd = {k: v for k, v in sd.items() if not _ignored(k)}
    top = _invert(_OPENCLIP_TOP)
    out = {top[k]: sd.pop(k) for k in list(sd) if k in top}
    if "text_projection" in sd:
        out["text_projection.weight"] = sd.pop("text_projection").T.contiguous()  # (D,P) -> (P,D)
    for n in range(int(config["num_hidden_layers"])):
        fused = f"transformer.resblocks.{n}.attn.in_proj_"
        attn = f"text_model.encoder.layers.{n}.self_attn"
        for kind in ("weight", "bias"):
            if fused + kind in sd:
                q, k, v = sd.pop(fused + kind).chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...)
                out.update(
                    {
                        f"{attn}.q_proj.{kind}": q,
                        f"{attn}.k_proj.{kind}": k,
                        f"{attn}.v_proj.{kind}": v,
                    }
                )
    out.update(
        _rename_all(sd, _invert(_layer_table(int(config["num_hidden_layers"]))), "SGM OpenCLIP")
    )
    return out


def _ignored(key: str) -> bool:
    """Buffers that SGM/transformers files may carry but our modules recompute."""
    return key.rsplit(".", 1)[-1] in _SGM_IGNORED_SUFFIXES


# ----------------------------------------------------------------------------- whole files


def sgm_to_diffusers(sd: dict, configs: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SGM single-file state dict into diffusers component state dicts.

    `configs` maps component name -> config.json dict (default SDXL base). Keys outside the
    four component prefixes (EMA copies, noise-schedule buffers) are dropped.
    """
    configs = configs or SDXL_BASE
    parts: dict[str, dict] = {name: {} for name in COMPONENTS}
    for key, value in sd.items():
        for name, prefix in SGM_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
    convert = {
        "unet": lambda s: unet_from_sgm(s, configs["unet"]),
        "vae": lambda s: vae_from_sgm(s, configs["vae"]),
        "text_encoder": clip_l_from_sgm,
        "text_encoder_2": lambda s: openclip_from_sgm(s, configs["text_encoder_2"]),
    }
    return {name: convert[name](part) for name, part in parts.items() if part}


def diffusers_to_sgm(components: dict[str, dict], configs: dict | None = None) -> dict:
    """Merge diffusers component state dicts into one SGM single-file state dict."""
    configs = configs or SDXL_BASE
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; expected some of {COMPONENTS}")
    convert = {
        "unet": lambda s: unet_to_sgm(s, configs["unet"]),
        "vae": lambda s: vae_to_sgm(s, configs["vae"]),
        "text_encoder": clip_l_to_sgm,
        "text_encoder_2": lambda s: openclip_to_sgm(s, configs["text_encoder_2"]),
    }
    out = {}
    for name, sd in components.items():
        prefix = SGM_PREFIXES[name]
        out.update({prefix + k: v for k, v in convert[name](sd).items()})
    return out


# ----------------------------------------------------------------------------- detection

_NEED = (
    "this library needs an SDXL base 1.0 checkpoint (e.g. sd_xl_base_1.0.safetensors or a "
    "fine-tune of it) or a diffusers SDXL folder"
)


def detect_architecture(keys: Iterable[str]) -> str:
    """Return "sdxl_base" for an SGM SDXL base file; raise ValueError saying what else it is."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(SGM_PREFIXES["text_encoder"]) and has(SGM_PREFIXES["text_encoder_2"]):
        return "sdxl_base"
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"this is an SDXL refiner checkpoint (one OpenCLIP text encoder); {_NEED}")
    if has("cond_stage_model.model."):
        raise ValueError(
            f"this is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); {_NEED}"
        )
    if has("cond_stage_model.transformer."):
        raise ValueError(
            f"this is a Stable Diffusion 1.x checkpoint (CLIP-L text encoder only); {_NEED}"
        )
    raise ValueError(f"{_describe_unknown(keys)}; {_NEED}")


def _describe_unknown(keys: list[str]) -> str:
    """Name the kind of file for checkpoints that are not full SD/SDXL models."""
    if not keys:
        return "the file holds no tensors"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        return "this is a LoRA file, not a base model (load it as a LoRA)"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return (
            "this is a single diffusers/transformers component file; "
            "pass the whole diffusers model folder instead"
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "this checkpoint has a UNet but no SDXL text encoders (UNet-only or another model)"
    return f"unrecognised checkpoint layout (first keys: {sorted(keys)[:3]})"
