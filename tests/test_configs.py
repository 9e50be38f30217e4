"""The component config dataclasses read diffusers/transformers config.json strictly."""

from __future__ import annotations

import pytest
import transformers

from sdxl.models.configs import SDXL_BASE, TINY, CLIPTextConfig, UNetConfig, VAEConfig

# ----------------------------------------------------------------------------- unet


def test_unet_from_dict_reads_sdxl_and_tiny():
    cfg = UNetConfig.from_dict(SDXL_BASE["unet"])
    assert cfg.num_attention_heads == (5, 10, 20)  # diffusers' attention_head_dim = head count
    assert cfg.transformer_layers_per_block == (1, 2, 10)
    assert cfg.layers_per_block == (2, 2, 2)
    assert UNetConfig.from_dict(TINY["unet"]).block_out_channels == (16, 32, 32)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_linear_projection", False),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
        ("up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"]),
        ("transformer_layers_per_block", [[1], [2], [3]]),
        ("num_attention_heads", [5, 10, 20]),
        ("addition_embed_type", "text"),
        ("time_cond_proj_dim", 256),
        ("norm_num_groups", 7),
        ("layers_per_block", [2, 2]),
        ("some_new_key", 1),
    ],
)
def test_unet_from_dict_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict({**SDXL_BASE["unet"], key: value})


def test_unet_from_dict_absent_key_uses_diffusers_default():
    cfg = {k: v for k, v in SDXL_BASE["unet"].items() if k != "use_linear_projection"}
    with pytest.raises(ValueError, match="use_linear_projection.*absent"):
        UNetConfig.from_dict(cfg)


# ----------------------------------------------------------------------------- vae


def test_vae_config_from_sdxl_dict():
    cfg = VAEConfig.from_dict(SDXL_BASE["vae"])
    assert cfg == VAEConfig()
    assert cfg.block_out_channels == (128, 256, 512, 512)
    assert cfg.scaling_factor == 0.13025 and cfg.downscale == 8
    assert VAEConfig.from_dict({**SDXL_BASE["vae"], "shift_factor": None}) == cfg


@pytest.mark.parametrize(
    "key, value",
    [
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"] * 3),
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0] * 4),
        ("use_quant_conv", False),
        ("mid_block_add_attention", False),
        ("norm_num_groups", 48),
        ("not_a_key", 1),
    ],
)
def test_vae_config_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key if key != "norm_num_groups" else "norm_num_groups"):
        VAEConfig.from_dict({**SDXL_BASE["vae"], key: value})


# ----------------------------------------------------------------------------- text encoders


def test_clip_config_from_dict():
    assert not CLIPTextConfig.from_dict(SDXL_BASE["text_encoder"]).with_projection
    big = CLIPTextConfig.from_dict(SDXL_BASE["text_encoder_2"])
    assert (big.with_projection, big.hidden_act, big.num_hidden_layers) == (True, "gelu", 32)
    saved = transformers.CLIPTextConfig.from_dict(TINY["text_encoder"]).to_dict()
    assert CLIPTextConfig.from_dict(saved) == CLIPTextConfig.from_dict(TINY["text_encoder"])
    assert CLIPTextConfig.from_dict({"with_projection": True}).with_projection
    bad = [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"dropout": 0.1}, "dropout"),
        ({"model_type": "clip_vision_model"}, "model_type"),
        ({"architectures": ["CLIPModel"]}, "architectures"),
        ({"rope_theta": 1.0}, "rope_theta"),
    ]
    for extra, key in bad:
        with pytest.raises(ValueError, match=key):
            CLIPTextConfig.from_dict({**TINY["text_encoder"], **extra})
