"""Key conversion (diffusers <-> SGM single file) and strict weight loading, on tiny models.

The diffusers/transformers models are the reference: our SGM files must read back through
diffusers' own single-file converters, and our loaders must reproduce their tensors exactly.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl import convert
from sdxl.models.configs import SCHEDULER, SDXL_BASE, TINY
from sdxl.models.networks import MODEL_CLASSES
from sdxl.weights import (
    WeightsError,
    build_on_meta,
    load_component,
    load_single_file,
    load_vae,
    save_single_file,
    vae_scaling_factor,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _load(folder, name: str, dtype=torch.float32, **kwargs):
    """load_component on the CPU into the network class of component `name`."""
    return load_component(folder, name, model_cls=MODEL_CLASSES[name], dtype=dtype,
                          device="cpu", **kwargs)  # fmt: skip


def _reference_models(configs: dict, seed: int = 0) -> dict[str, torch.nn.Module]:
    """diffusers/transformers SDXL components with seeded random weights (every tensor random)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
    }
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models.values():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return {n: m.eval() for n, m in models.items()}


def _hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the key names of the SDXL files on the hub (`text_model.` kept)."""
    sd = model.state_dict()
    if any(k.startswith(("embeddings.", "encoder.layers.")) for k in sd):
        sd = convert.with_text_model_prefix(sd)
    return sd


@pytest.fixture(scope="module")
def ref_models():
    return _reference_models(TINY)


@pytest.fixture(scope="module")
def ref_sds(ref_models):
    return {n: _hub_state_dict(m) for n, m in ref_models.items()}


@pytest.fixture(scope="module")
def ref_dir(ref_models, tmp_path_factory):
    """A diffusers-layout folder written by the reference libraries' own save_pretrained."""
    folder = tmp_path_factory.mktemp("ref") / "sdxl"
    for name, model in ref_models.items():
        model.save_pretrained(folder / name)
    return folder


def _assert_same(got: dict, want: dict, dtype: torch.dtype = torch.float32) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], v.to(dtype)), k


# ----------------------------------------------------------------------------- conversion


def test_round_trip_tiny_is_exact(ref_sds):
    sgm = convert.diffusers_to_sgm(ref_sds, TINY)
    assert all(k.startswith(tuple(convert.SGM_PREFIXES.values())) for k in sgm)
    back = convert.sgm_to_diffusers(sgm, TINY)
    for name in convert.COMPONENTS:
        _assert_same(back[name], ref_sds[name])
    again = convert.diffusers_to_sgm(back, TINY)
    assert set(again) == set(sgm)
    assert all(torch.equal(again[k], sgm[k]) for k in sgm)


def test_sgm_layout_details(ref_sds):
    sgm = convert.diffusers_to_sgm(ref_sds, TINY)
    unet, vae = ref_sds["unet"], ref_sds["vae"]
    u, f = "model.diffusion_model.", "first_stage_model."
    pairs = {  # SGM key -> diffusers key (see DESIGN.md block map)
        u + "input_blocks.0.0.weight": unet["conv_in.weight"],
        u + "input_blocks.2.0.in_layers.2.weight": unet["down_blocks.0.resnets.1.conv1.weight"],
        u + "input_blocks.3.0.op.weight": unet["down_blocks.0.downsamplers.0.conv.weight"],
        u + "input_blocks.4.0.skip_connection.weight": unet[
            "down_blocks.1.resnets.0.conv_shortcut.weight"
        ],
        u + "input_blocks.8.1.proj_in.weight": unet["down_blocks.2.attentions.1.proj_in.weight"],
        u + "middle_block.2.emb_layers.1.bias": unet["mid_block.resnets.1.time_emb_proj.bias"],
        u + "output_blocks.2.2.conv.weight": unet["up_blocks.0.upsamplers.0.conv.weight"],
        u + "output_blocks.5.1.norm.bias": unet["up_blocks.1.attentions.2.norm.bias"],
        u + "output_blocks.8.0.out_layers.3.weight": unet["up_blocks.2.resnets.2.conv2.weight"],
        u + "label_emb.0.2.weight": unet["add_embedding.linear_2.weight"],
        u + "time_embed.0.bias": unet["time_embedding.linear_1.bias"],
        u + "out.2.weight": unet["conv_out.weight"],
        f + "decoder.up.3.block.1.conv1.weight": vae["decoder.up_blocks.0.resnets.1.conv1.weight"],
        f + "decoder.up.0.block.0.nin_shortcut.bias": vae[
            "decoder.up_blocks.3.resnets.0.conv_shortcut.bias"
        ],
        f + "decoder.up.1.upsample.conv.weight": vae[
            "decoder.up_blocks.2.upsamplers.0.conv.weight"
        ],
        f + "encoder.down.2.downsample.conv.bias": vae[
            "encoder.down_blocks.2.downsamplers.0.conv.bias"
        ],
        f + "encoder.mid.block_2.norm2.weight": vae["encoder.mid_block.resnets.1.norm2.weight"],
        f + "encoder.norm_out.weight": vae["encoder.conv_norm_out.weight"],
        f + "decoder.mid.attn_1.norm.weight": vae[
            "decoder.mid_block.attentions.0.group_norm.weight"
        ],
    }
    for key, value in pairs.items():
        assert torch.equal(sgm[key], value), key
    q = vae["encoder.mid_block.attentions.0.to_q.weight"]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
    assert torch.equal(sgm[f + "encoder.mid.attn_1.q.weight"], q[:, :, None, None])
    assert sgm[f + "decoder.mid.attn_1.proj_out.weight"].shape == (*q.shape, 1, 1)
    g, te2 = "conditioner.embedders.1.model.", ref_sds["text_encoder_2"]
    attn = "text_model.encoder.layers.1.self_attn."
    fused = torch.cat([te2[attn + p + "_proj.weight"] for p in "qkv"])
    assert torch.equal(sgm[g + "transformer.resblocks.1.attn.in_proj_weight"], fused)
    assert torch.equal(sgm[g + "text_projection"], te2["text_projection.weight"].T)  # (D, P)
    assert torch.equal(
        sgm[g + "positional_embedding"], te2["text_model.embeddings.position_embedding.weight"]
    )
    assert torch.equal(
        sgm[g + "transformer.resblocks.2.mlp.c_proj.bias"],
        te2["text_model.encoder.layers.2.mlp.fc2.bias"],
    )
    clip_l = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(sgm[clip_l], ref_sds["text_encoder"]["text_model.final_layer_norm.weight"])


def test_diffusers_converters_read_our_sgm_dict(ref_models, ref_sds):
    """diffusers' own single-file converters turn our SGM dict back into the reference weights."""
    from diffusers.loaders import single_file_utils as sfu

    sgm = convert.diffusers_to_sgm(ref_sds, TINY)
    _assert_same(sfu.convert_ldm_unet_checkpoint(sgm, TINY["unet"]), ref_sds["unet"])
    _assert_same(sfu.convert_ldm_vae_checkpoint(sgm, TINY["vae"]), ref_sds["vae"])
    _assert_same(sfu.convert_ldm_clip_checkpoint(sgm), ref_sds["text_encoder"])
    bigg = sfu.convert_open_clip_checkpoint(
        ref_models["text_encoder_2"], sgm, prefix="conditioner.embedders.1.model."
    )
    _assert_same(bigg, ref_sds["text_encoder_2"])


def test_full_sdxl_key_sets_round_trip():
    """Full-size SDXL key/shape sets (meta-device reference models) survive the round trip."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(SDXL_BASE["unet"]),
            "vae": AutoencoderKL.from_config(SDXL_BASE["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_BASE["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**SDXL_BASE["text_encoder_2"])
            ),
        }
    sds = {n: _hub_state_dict(m) for n, m in models.items()}
    sgm = convert.diffusers_to_sgm(sds)
    # Keys of stabilityai sd_xl_base_1.0.safetensors (deepest / last of each kind).
    for key in (
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    ):
        assert key in sgm, key
    assert sgm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert sgm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert convert.detect_architecture(sgm) == "sdxl_base"
    back = convert.sgm_to_diffusers(sgm)
    for name, sd in sds.items():
        assert {k: tuple(v.shape) for k, v in back[name].items()} == {
            k: tuple(v.shape) for k, v in sd.items()
        }


def test_unmapped_keys_are_an_error(ref_sds):
    sgm = convert.diffusers_to_sgm(ref_sds, TINY)
    sgm["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="input_blocks.99"):
        convert.sgm_to_diffusers(sgm, TINY)
    with pytest.raises(ValueError, match="unknown component"):
        convert.diffusers_to_sgm({"controlnet": {}})


def test_sgm_buffers_and_extras_are_dropped(ref_sds):
    sgm = convert.diffusers_to_sgm(ref_sds, TINY)
    sgm["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(
        77
    )[None]
    sgm["conditioner.embedders.1.model.logit_scale"] = torch.ones(())
    sgm["model_ema.decay"] = torch.ones(())
    sgm["alphas_cumprod"] = torch.ones(1000)
    back = convert.sgm_to_diffusers(sgm, TINY)
    for name in convert.COMPONENTS:
        assert set(back[name]) == set(ref_sds[name])


# ----------------------------------------------------------------------------- detection


def _keys(*prefixes: str) -> list[str]:
    return [f"{p}.weight" for p in prefixes]


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (
            _keys(
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding",
                "first_stage_model.encoder.conv_in",
            ),
            "Stable Diffusion 1.x",
        ),
        (
            _keys(
                "model.diffusion_model.input_blocks.1.1.proj_in",
                "cond_stage_model.model.token_embedding",
            ),
            "Stable Diffusion 2.x",
        ),
        (
            _keys(
                "model.diffusion_model.label_emb.0.0",
                "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj",
            ),
            "SDXL refiner",
        ),
        (_keys("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down"), "LoRA"),
        (_keys("down_blocks.0.resnets.0.conv1", "conv_in"), "diffusers"),
        (_keys("model.diffusion_model.input_blocks.0.0"), "no SDXL text encoders"),
        (_keys("foo.bar", "baz"), "unrecognised"),
        ([], "no tensors"),
    ],
)
def test_detect_architecture_rejects_other_models(keys, match):
    with pytest.raises(ValueError, match=match) as err:
        convert.detect_architecture(keys)
    assert "SDXL base" in str(err.value)


def test_detect_architecture_sdxl_base():
    keys = _keys(
        "model.diffusion_model.label_emb.0.0",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_1",
        "first_stage_model.encoder.conv_in",
    )
    assert convert.detect_architecture(keys) == "sdxl_base"


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_component_matches_reference(ref_dir, ref_sds, dtype):
    for name in convert.COMPONENTS:
        model = _load(ref_dir, name, dtype=dtype)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        _assert_same(model.state_dict(), ref_sds[name], dtype)


def test_hub_layout_text_encoder_with_position_ids(ref_dir, ref_sds, tmp_path):
    """The SDXL hub files keep `text_model.` and an int64 position_ids buffer; both load."""
    folder = tmp_path / "m" / "text_encoder"
    folder.mkdir(parents=True)
    shutil.copy(ref_dir / "text_encoder" / "config.json", folder / "config.json")
    sd = dict(
        ref_sds["text_encoder"], **{"text_model.embeddings.position_ids": torch.arange(77)[None]}
    )
    save_file(sd, folder / "model.safetensors")
    model = _load(tmp_path / "m", "text_encoder")
    _assert_same(model.state_dict(), ref_sds["text_encoder"])


def test_build_on_meta_allocates_nothing():
    model = build_on_meta("unet", MODEL_CLASSES["unet"], SDXL_BASE["unet"])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 2_500_000_000


def test_fp16_variant_and_sharded_folders(ref_models, ref_sds, tmp_path):
    unet = copy.deepcopy(ref_models["unet"])
    unet.save_pretrained(tmp_path / "fp32" / "unet", max_shard_size="200KB")
    index = tmp_path / "fp32" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists()
    model = _load(tmp_path / "fp32", "unet")
    _assert_same(model.state_dict(), ref_sds["unet"])
    with pytest.raises(WeightsError, match="no fp16-variant safetensors"):
        _load(tmp_path / "fp32", "unet", dtype=torch.float16, variant="fp16")

    te2 = copy.deepcopy(ref_models["text_encoder_2"]).half()
    te2.save_pretrained(tmp_path / "fp16" / "text_encoder_2", variant="fp16")
    want = {k: v.half() for k, v in ref_sds["text_encoder_2"].items()}
    for variant in ("fp16", None):  # None falls back to fp16 when there is no fp32 file
        model = _load(tmp_path / "fp16", "text_encoder_2", dtype=torch.float16, variant=variant)
        _assert_same(model.state_dict(), want, torch.float16)

    shard = sorted((tmp_path / "fp32" / "unet").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match="shard"):
        _load(tmp_path / "fp32", "unet")


@pytest.fixture
def vae_dir(ref_dir, tmp_path):
    """A writable copy of the reference VAE folder."""
    shutil.copytree(ref_dir / "vae", tmp_path / "m" / "vae")
    return tmp_path / "m"


def test_missing_folder_and_config(vae_dir):
    with pytest.raises(WeightsError, match="component folder not found"):
        _load(vae_dir, "unet")
    (vae_dir / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config\.json: missing"):
        _load(vae_dir, "vae")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "missing"])
def test_damaged_weights_file(vae_dir, damage):
    path = vae_dir / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
            .to(torch.uint8)
            .numpy()
            .tobytes()
        )
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    match = "no safetensors weights" if damage == "missing" else "download it again"
    with pytest.raises(WeightsError, match=match) as err:
        _load(vae_dir, "vae")
    assert str(path.parent) in str(err.value)


def test_shape_and_key_mismatches(vae_dir):
    path = vae_dir / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    bad = dict(sd, **{"decoder.conv_in.bias": torch.zeros(7)})
    save_file(bad, path)
    with pytest.raises(WeightsError, match=r"decoder\.conv_in\.bias: expected \(32,\), got \(7,\)"):
        _load(vae_dir, "vae")
    partial = {k: v for k, v in sd.items() if not k.startswith("decoder.mid_block")}
    partial["extra.weight"] = torch.zeros(1)
    save_file(partial, path)
    with pytest.raises(
        WeightsError,
        match=r"missing key\(s\).*decoder\.mid_block.*1 unexpected key\(s\) \(e\.g\. extra\.weight\)",
    ):
        _load(vae_dir, "vae")


def test_config_of_another_architecture(vae_dir):
    config_path = vae_dir / "vae" / "config.json"
    config_path.write_text(json.dumps(TINY["unet"]))
    with pytest.raises(WeightsError, match="must hold a AutoencoderKL config"):
        _load(vae_dir, "vae")
    sd15_unet = dict(TINY["unet"], addition_embed_type=None, cross_attention_dim=768)
    shutil.copytree(vae_dir / "vae", vae_dir / "unet")
    (vae_dir / "unet" / "config.json").write_text(json.dumps(sd15_unet))
    with pytest.raises(WeightsError, match="unsupported unet config"):
        _load(vae_dir, "unet")


def test_load_vae_from_the_model_or_a_separate_folder(vae_dir, tmp_path):
    own = load_vae(
        vae_dir, model_cls=MODEL_CLASSES["vae"], device="cpu", dtype=torch.float32
    ).state_dict()
    shutil.copytree(vae_dir / "vae", tmp_path / "sdxl-vae")  # config.json + weights at the top
    for folder in (tmp_path / "sdxl-vae", vae_dir):  # a VAE folder, or a model folder with vae/
        other = load_vae(
            tmp_path / "elsewhere",
            folder,
            model_cls=MODEL_CLASSES["vae"],
            device="cpu",
            dtype=torch.float32,
        )
        _assert_same(other.state_dict(), own, torch.float32)
    want = json.loads((vae_dir / "vae" / "config.json").read_text())["scaling_factor"]
    assert vae_scaling_factor(vae_dir) == vae_scaling_factor(tmp_path, vae_dir) == want
    with pytest.raises(WeightsError, match="VAE folder holding config.json"):
        vae_scaling_factor(tmp_path, tmp_path)


# ----------------------------------------------------------------------------- single file


def test_single_file_save_and_load(ref_dir, ref_sds, tmp_path):
    path = save_single_file(ref_sds, tmp_path / "sdxl.safetensors", configs=TINY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp left
    for kwargs in ({"configs": TINY}, {"config_dir": ref_dir}):
        models = load_single_file(
            path, model_classes=MODEL_CLASSES, dtype=torch.bfloat16, device="cpu", **kwargs
        )
        for name in convert.COMPONENTS:
            assert not models[name].training
            _assert_same(models[name].state_dict(), ref_sds[name], torch.bfloat16)


def test_single_file_errors(ref_sds, tmp_path):
    sd15 = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(
            2, 2
        ),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
    }
    save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(WeightsError, match=r"sd15\.safetensors: this is a Stable Diffusion 1\.x"):
        load_single_file(
            tmp_path / "sd15.safetensors",
            model_classes=MODEL_CLASSES,
            dtype=torch.float32,
            device="cpu",
        )
    no_vae = {n: sd for n, sd in ref_sds.items() if n != "vae"}
    save_single_file(no_vae, tmp_path / "novae.safetensors", configs=TINY)
    with pytest.raises(WeightsError, match=r"no weights for \['vae'\]"):
        load_single_file(
            tmp_path / "novae.safetensors",
            model_classes=MODEL_CLASSES,
            dtype=torch.float32,
            device="cpu",
            configs=TINY,
        )
    full = save_single_file(ref_sds, tmp_path / "tiny.safetensors", configs=TINY)
    with pytest.raises(WeightsError, match="missing key"):  # tiny weights, SDXL base configs
        load_single_file(full, model_classes=MODEL_CLASSES, dtype=torch.float32, device="cpu")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_single_file(
            tmp_path / "model.ckpt", model_classes=MODEL_CLASSES, dtype=torch.float32, device="cpu"
        )
    with pytest.raises(WeightsError, match="file not found"):
        load_single_file(
            tmp_path / "nope.safetensors",
            model_classes=MODEL_CLASSES,
            dtype=torch.float32,
            device="cpu",
        )


def test_diffusers_from_single_file_reads_our_file(tmp_path):
    """diffusers' StableDiffusionXLPipeline.from_single_file loads what save_single_file writes.

    The two text encoders get different widths: diffusers tells them apart by width.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sdxl.tiny_tokenizer import write_tokenizer

    configs = copy.deepcopy(TINY)
    configs["text_encoder_2"].update(hidden_size=48, intermediate_size=96)
    configs["unet"].update(cross_attention_dim=80)
    models = _reference_models(configs, seed=1)
    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(tmp_path / name)
    pipe = StableDiffusionXLPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    sds = {n: _hub_state_dict(m) for n, m in models.items()}
    path = save_single_file(sds, tmp_path / "sdxl.safetensors", configs=configs)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tmp_path / "pipe"), local_files_only=True
    )
    for name in convert.COMPONENTS:
        _assert_same(_hub_state_dict(getattr(loaded, name)), sds[name])
