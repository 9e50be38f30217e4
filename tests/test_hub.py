"""Which files a Hub download fetches (the Hub itself is not reachable from tests)."""

from __future__ import annotations

import pytest

from sdxl.hub import select_files

# The file list of stabilityai/stable-diffusion-xl-base-1.0 (abridged to the relevant kinds).
REPO = [
    ".gitattributes", "README.md", "LICENSE.md", "model_index.json", "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx", "text_encoder/flax_model.msgpack", "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_2/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer_2/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/openvino_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx",
]  # fmt: skip


def test_fp32_selection_is_exactly_what_sdxl_needs():
    got = select_files(REPO)
    weights = [f for f in got if f.endswith(".safetensors")]
    assert weights == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ]
    assert got[-1] == "model_index.json"
    assert "scheduler/scheduler_config.json" in got and "tokenizer_2/vocab.json" in got
    assert not any(
        f.startswith(("vae_1_0", "vae_decoder")) or f.endswith((".onnx", ".bin")) for f in got
    )


def test_fp16_variant_and_configs_only():
    got = select_files(REPO, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    assert not any(f.endswith(".safetensors") for f in select_files(REPO, weights=False))


def test_sharded_weights_are_fetched_with_their_index():
    repo = [f for f in REPO if not f.startswith("unet/diffusion")] + [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    got = select_files(repo)
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in got
    assert "unet/diffusion_pytorch_model-00002-of-00002.safetensors" in got


def test_repo_without_weights_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="unet/"):
        select_files([f for f in REPO if not f.startswith("unet/diffusion")])
