"""LoRA layers, injection, merge and file formats, against diffusers/PEFT on the tiny SDXL UNet."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdxl.lora import (
    LoRAConfig,
    LoRALinear,
    apply_loras,
    inject_lora,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_multiplier,
    split_lora_state,
    unmerge_lora,
)
from sdxl.lora_formats import LoRAFileError, load_lora_file
from sdxl.lora_formats.kohya import kohya_to_state, save_kohya, state_to_kohya
from sdxl.lora_formats.layout import SDXL_LAYOUT, UNetLayout, diffusers_to_sgm, sgm_to_diffusers
from sdxl.lora_formats.peft import save_peft, state_to_peft
from sdxl.lora_formats.seed import save_seed_pt
from sdxl.models.configs import SCHEDULER, SDXL_BASE, TINY, UNetConfig
from sdxl.models.unet import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ours(base_state, dtype=torch.float32) -> UNet2DConditionModel:
    """A fresh tiny UNet of ours with the shared base weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"]))
    unet.load_state_dict({k: v.clone() for k, v in base_state.items()}, strict=True, assign=True)
    return unet.to(dtype).eval()


@torch.no_grad()
def run(unet: nn.Module, inputs) -> torch.Tensor:
    sample, t, context, text_embeds, time_ids = inputs
    if isinstance(unet, UNet2DConditionModel):
        return unet(sample.to(unet.conv_in.weight.dtype), t, context, text_embeds, time_ids)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return unet(sample, t, context, added_cond_kwargs=added).sample


def random_lora(model: nn.Module, config: LoRAConfig, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state with non-zero up factors (inject, randomise, read back, remove)."""
    g = torch.Generator().manual_seed(seed)
    inject_lora(model, config, generator=g)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            w = layer.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    remove_lora(model)
    return state


CONFIG = LoRAConfig(
    rank=4, alpha=8.0, target="attention_out", conv=True, conv_rank=2, conv_alpha=1.0
)


# ----------------------------------------------------------------------------- config


def test_config_validation():
    assert LoRAConfig.from_dict({"target": ["to_q$", "ff"]}).target == ("to_q$", "ff")
    bad = [
        dict(rank=0),
        dict(rank=2.0),
        dict(alpha=0),
        dict(alpha=float("nan")),
        dict(dropout=1.0),
        dict(target="attn"),
        dict(target=[]),
        dict(target=["(unclosed"]),
        dict(conv_rank=4),
        dict(conv="yes"),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown key"):
        LoRAConfig.from_dict({"lora_rank": 4})


def test_param_counts_full_sdxl():
    for build in (
        lambda: UNet2DConditionModel(UNetConfig.from_dict(SDXL_BASE["unet"])),
        lambda: diffusers.UNet2DConditionModel.from_config(SDXL_BASE["unet"]),
    ):
        with torch.device("meta"):
            unet = build()
        for target, expected in (("attention", 4_474_880), ("attention_out", 5_806_080)):
            inject_lora(unet, LoRAConfig(rank=4, alpha=4.0, target=target))
            assert sum(p.numel() for p in lora_parameters(unet)) == expected
            remove_lora(unet)


# ----------------------------------------------------------------------------- layers


def test_zero_init_identity_and_base_names(base_state, inputs):
    unet = ours(base_state)
    before = run(unet, inputs)
    layers = inject_lora(unet, CONFIG, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(unet, inputs), before)
    lora_keys = set(lora_state_dict(unet))
    assert set(unet.state_dict()) - lora_keys == set(base_state)  # base keys unchanged
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        k for k in lora_keys if not k.endswith(".alpha")
    }
    assert any(isinstance(m, LoRALinear) for m in layers.values())
    assert layers["down_blocks.0.resnets.0.conv1"].rank == 2  # conv_rank for 3x3 convs
    assert layers["down_blocks.1.resnets.0.conv_shortcut"].rank == 4  # 1x1: rank
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(unet, CONFIG)
    remove_lora(unet)
    assert not lora_modules(unet) and set(unet.state_dict()) == set(base_state)
    with pytest.raises(ValueError, match="matched no"):
        inject_lora(unet, LoRAConfig(target=["no_such_module"]))


def test_merge_equals_unmerged_and_unmerge_restores(base_state, inputs):
    unet = ours(base_state)
    apply_loras(unet, [(random_lora(unet, CONFIG, seed=1), 1.0)])
    unmerged = run(unet, inputs)
    assert rel_err(unmerged, run(ours(base_state), inputs)) > 1e-3  # the LoRA does something
    merge_lora(unet)
    assert rel_err(run(unet, inputs), unmerged) < 1e-5
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(unet)
    unmerge_lora(unet)
    for key, value in unet.state_dict().items():
        if key in base_state:
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=1e-6)
    assert rel_err(run(unet, inputs), unmerged) < 1e-6


def test_multiplier_scales(base_state, inputs):
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=3.0)
    nn.init.normal_(layer.lora_up.weight)
    nn.init.normal_(layer.lora_down.weight)
    x = torch.randn(5, 8)
    one = layer.lora_forward(x)
    layer.multiplier = -2.5
    torch.testing.assert_close(layer.lora_forward(x), -2.5 * one)
    torch.testing.assert_close(
        layer(x) - nn.functional.linear(x, layer.weight, layer.bias), -2.5 * one
    )

    unet = ours(base_state)
    apply_loras(unet, [(random_lora(unet, CONFIG, seed=2), 1.0)])
    set_lora_multiplier(unet, 0.0)
    assert torch.equal(run(unet, inputs), run(ours(base_state), inputs))
    merge_lora(unet, multiplier=2.0)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = lora_modules(unet)[name]
    delta = layer.weight - base_state[f"{name}.weight"]
    layer.multiplier = 1.0
    torch.testing.assert_close(delta, 2.0 * layer.delta_weight(), rtol=1e-5, atol=1e-7)


def merged_reference(base_state, loras) -> UNet2DConditionModel:
    """A plain UNet whose weights are base + sum of multiplier * (alpha / r) * up @ down."""
    state = dict(base_state)
    for lora, multiplier in loras:
        for name, w in split_lora_state(lora).items():
            state[f"{name}.weight"] = state[f"{name}.weight"] + multiplier * w.delta()
    return ours(state)


def test_two_loras_at_once(base_state, inputs):
    unet = ours(base_state)
    first = random_lora(unet, CONFIG, seed=3)
    second = random_lora(unet, LoRAConfig(rank=3, alpha=1.5, target="all"), seed=4)
    loras = [(first, 0.7), (second, -1.3)]
    expected = run(merged_reference(base_state, loras), inputs)
    apply_loras(unet, loras)
    assert rel_err(run(unet, inputs), expected) < 1e-5
    remove_lora(unet)
    assert torch.equal(run(unet, inputs), run(ours(base_state), inputs))
    apply_loras(unet, loras, merge=True)
    assert rel_err(run(unet, inputs), expected) < 1e-5
    remove_lora(unet, bake=True)
    assert not lora_modules(unet)
    assert rel_err(run(unet, inputs), expected) < 1e-5


def test_state_dict_roundtrip_and_strict_load(base_state, inputs):
    unet = ours(base_state)
    state = random_lora(unet, CONFIG, seed=5)
    inject_lora(unet, CONFIG)
    load_lora_state_dict(unet, state)
    expected = run(merged_reference(base_state, [(state, 1.0)]), inputs)
    assert rel_err(run(unet, inputs), expected) < 1e-5
    missing = {k: v for k, v in state.items() if "conv1" not in k}
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(unet, missing)
    load_lora_state_dict(unet, missing, strict=False)
    extra = {
        "conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
        "conv_in.lora_up.weight": torch.zeros(16, 4, 1, 1),
    }
    unexpected = dict(state, **extra)
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(unet, unexpected, strict=False)


def test_bf16_base_fp32_lora_training_keeps_updates(base_state, inputs):
    """Regression for the seed: bf16 LoRA weights rounded ~94% of AdamW updates away."""
    unet = ours(base_state, torch.bfloat16).train()
    inject_lora(unet, LoRAConfig(rank=4, alpha=4.0), generator=torch.Generator().manual_seed(0))
    params = lora_parameters(unet)
    assert all(p.dtype == torch.float32 for p in params)
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sample, t, context, text_embeds, time_ids = inputs
    target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(2))
    args = (sample.bfloat16(), t, context.bfloat16(), text_embeds.bfloat16(), time_ids)
    for _ in range(3):
        loss = (unet(*args).float() - target).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        optimizer.step()
        optimizer.zero_grad()
    downs, ups = params[0::2], params[1::2]
    changed = torch.cat([(p != p0).flatten() for p, p0 in zip(params, initial, strict=True)])
    assert changed.float().mean() > 0.99
    # In bf16 the same updates would have vanished: most A entries keep their bf16 value.
    same_in_bf16 = torch.cat(
        [
            (p.bfloat16() == p0.bfloat16()).flatten()
            for p, p0 in zip(downs, initial[0::2], strict=True)
        ]
    )
    assert same_in_bf16.float().mean() > 0.5
    for layer in lora_modules(unet).values():
        assert layer.delta_weight().abs().max() > 1e-6
    assert all(u.abs().max() > 5e-5 for u in ups)


def test_compiles_without_graph_breaks():
    layer = LoRALinear(nn.Linear(8, 6).to(torch.bfloat16), rank=2, alpha=2.0)
    nn.init.normal_(layer.lora_up.weight)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), layer(x))
    layer.merge()
    torch.testing.assert_close(compiled(x), layer(x))


def test_fused_transformer_with_lora_compiles_without_graph_breaks(base_state, inputs):
    """A fused-QKV transformer with stacked LoRAs and selective checkpointing: one graph, both
    for the training step (same loss and grads as eager) and merged for inference."""
    unet = ours(base_state)
    unet.fuse_qkv()
    inject_lora(unet, CONFIG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_modules(unet).values():
            layer.lora_up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    unet.set_gradient_checkpointing("selective")
    block = unet.mid_block.attentions[0].train()  # the Transformer2DModel regional compile gets
    x, context = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(2)), inputs[2]
    params = [p for p in block.parameters() if p.requires_grad]

    def loss_and_grads(model):
        loss = model(x, context).square().mean()
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, expected in zip(loss_and_grads(compiled), loss_and_grads(block), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    merge_lora(block)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x, context), block(x, context))


# ----------------------------------------------------------------------------- SGM map + formats


# Not SDXL's block layout: one resnet per level, attention at the top level but not the bottom.
OTHER_LAYOUT_UNET = {
    **TINY["unet"],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@pytest.mark.parametrize("config", [TINY["unet"], OTHER_LAYOUT_UNET], ids=["tiny", "other"])
def test_sgm_map_matches_diffusers_single_file_conversion(config):
    """Every module path we map to SGM is mapped back to itself by diffusers' ldm converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    layout = UNetLayout.from_config(unet.config)
    assert layout == UNetLayout.from_config(config)
    assert (layout == SDXL_LAYOUT) == (config is TINY["unet"])
    keys = list(unet.state_dict())
    ldm = {}
    for i, key in enumerate(keys):
        module, _, param = key.rpartition(".")
        sgm = diffusers_to_sgm(module, layout)
        assert sgm_to_diffusers(sgm, layout) == module
        ldm[f"model.diffusion_model.{sgm}.{param}"] = torch.tensor(i)
    converted = convert_ldm_unet_checkpoint(ldm, config)
    assert {k: int(v) for k, v in converted.items()} == {k: i for i, k in enumerate(keys)}
    with pytest.raises(ValueError, match="not a module"):
        sgm_to_diffusers("input_blocks.1.1.proj_in")  # SD1.x: SDXL's first level has no attention
    with pytest.raises(ValueError, match="not a module"):
        sgm_to_diffusers("output_blocks.9.0.in_layers.2")  # SD1.x has 12 output blocks
    with pytest.raises(ValueError, match="not a module"):
        diffusers_to_sgm("up_blocks.3.resnets.0.conv1")


def test_kohya_keys_shapes_and_metadata(base_state, tmp_path):
    unet = ours(base_state)
    state = random_lora(unet, CONFIG, seed=6)
    path = tmp_path / "lora_final.safetensors"
    save_kohya(path, state, {"modelspec.prediction_type": "v"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert meta["modelspec.prediction_type"] == "v"
    sgm_weights = {
        "lora_unet_" + diffusers_to_sgm(key.removesuffix(".weight")).replace(".", "_"): value
        for key, value in base_state.items()
        if key.endswith(".weight")
    }
    assert len(tensors) == 3 * len(split_lora_state(state))
    for key, value in tensors.items():
        assert key.startswith("lora_unet_")
        name, _, suffix = key.partition(".")
        weight = sgm_weights[name]
        if suffix == "lora_down.weight":
            assert value.shape[1:] == weight.shape[1:]
        elif suffix == "lora_up.weight":
            assert value.shape[0] == weight.shape[0] and value.shape[2:] in ((), (1, 1))
        else:
            assert suffix == "alpha" and value.ndim == 0
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_out_0" in sgm_weights
    assert "lora_unet_output_blocks_2_2_conv.alpha" in tensors  # the upsampler (LoCon)


def deltas(state) -> dict[str, torch.Tensor]:
    return {name: w.delta() for name, w in split_lora_state(state).items()}


def assert_same_lora(a, b):
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    for name in da:
        torch.testing.assert_close(da[name], db[name], rtol=1e-6, atol=1e-7)


def test_file_roundtrips(base_state, tmp_path):
    unet = ours(base_state)
    state = random_lora(unet, CONFIG, seed=7)
    linear = random_lora(unet, LoRAConfig(rank=4, alpha=2.0, target="all"), seed=8)
    linear["mid_block.attentions.0.proj_in.alpha"] = torch.tensor(3.0)  # a per-module alpha
    for save, lora, fmt in (
        (save_kohya, state, "kohya"),
        (save_peft, state, "peft"),
        (save_seed_pt, linear, "seed"),
    ):
        path = tmp_path / f"{fmt}.{'pt' if fmt == 'seed' else 'safetensors'}"
        save(path, lora)
        loaded, info = load_lora_file(path, unet=unet)
        assert info.format == fmt
        assert_same_lora(loaded, lora)
    assert info.rank == 4 and info.alpha == 2.0
    raw = torch.load(tmp_path / "seed.pt", weights_only=True)  # what the seed's tools read
    assert raw["is_lora_checkpoint"] and raw["config"]["lora_target_mode"] == "all"
    assert (raw["config"]["lora_rank"], raw["config"]["lora_alpha"]) == (4, 2.0)
    with pytest.raises(ValueError, match="Linear LoRAs only"):
        save_seed_pt(tmp_path / "conv.pt", state)
    # Our own state saved as is also loads.
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ours.safetensors")
    loaded, info = load_lora_file(tmp_path / "ours.safetensors")
    assert info.format == "sdxl"
    assert_same_lora(loaded, state)
    assert_same_lora(kohya_to_state(state_to_kohya(state))[0], state)


def test_other_layout_roundtrips_through_its_config(tmp_path):
    """The kohya names follow `unet.config`'s block layout, not SDXL's."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(OTHER_LAYOUT_UNET))
    state = random_lora(unet, CONFIG, seed=11)
    path = tmp_path / "other.safetensors"
    save_kohya(path, state, layout=UNetLayout.from_config(unet.config))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in names
    loaded, info = load_lora_file(path, unet=unet)
    assert info.format == "kohya"
    assert_same_lora(loaded, state)
    with pytest.raises(LoRAFileError, match="not a module"):
        load_lora_file(path)  # read as SDXL's layout, its first level has no attention


def test_loads_what_the_seed_and_diffusers_wrote(tmp_path):
    """A seed training checkpoint (A [in, r], B [r, out], bf16) and diffusers' kohya converter."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    g = torch.Generator().manual_seed(9)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    a, b = torch.randn(2048, 8, generator=g), torch.randn(8, 640, generator=g)
    checkpoint = {
        "lora_state_dict": {
            f"{name}.lora_layer.lora_A": a.bfloat16(),
            f"{name}.lora_layer.lora_B": b.bfloat16(),
        },
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]},
        "step": 3,
        "epoch": 0,
        "config": {"lora_rank": 8, "lora_alpha": 32.0, "lora_target_mode": "attention"},
        "checkpoint_version": "1.0",
        "is_lora_checkpoint": True,
    }
    torch.save(checkpoint, tmp_path / "lora_final_20250101_000000.pt")
    state, info = load_lora_file(tmp_path / "lora_final_20250101_000000.pt")
    assert info.format == "seed" and info.alphas == {name: 32.0}
    expected = 4.0 * (b.bfloat16().float().T @ a.bfloat16().float().T)
    torch.testing.assert_close(deltas(state)[name], expected)

    lora = {
        f"{name}.lora_down.weight": torch.randn(4, 2048, generator=g),
        f"{name}.lora_up.weight": torch.randn(640, 4, generator=g),
        f"{name}.alpha": torch.tensor(4.0),
    }
    peft_tensors, _ = state_to_peft(lora)
    kohya = convert_state_dict_to_kohya(peft_tensors)  # diffusers module names, alpha = rank
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in kohya
    save_file(kohya, tmp_path / "diffusers_kohya.safetensors")
    state, info = load_lora_file(tmp_path / "diffusers_kohya.safetensors")
    assert info.format == "kohya"
    assert_same_lora(state, lora)


# ----------------------------------------------------------------------------- diffusers loads ours


def tiny_pipeline(base_state, tmp_path):
    """A diffusers StableDiffusionXLPipeline built in memory from the TINY configs."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from sdxl.tiny_tokenizer import write_tokenizer

    unet = diffusers.UNet2DConditionModel.from_config(TINY["unet"])
    unet.load_state_dict(base_state, strict=True)
    tokenizers = []
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_tokenizer(tmp_path / name, pad_token=pad)
        tokenizers.append(CLIPTokenizer.from_pretrained(tmp_path / name))
    return diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL.from_config(TINY["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(TINY["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(TINY["text_encoder_2"])
        ),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet.eval(),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER),
    )


@pytest.mark.parametrize(
    ("fmt", "fused"), [("kohya", False), ("peft", False), ("kohya", True)], ids=str
)
def test_diffusers_load_lora_weights_matches_ours(base_state, inputs, tmp_path, fmt, fused):
    unet = ours(base_state)
    if fused:  # saved from, and applied to, a fused-QKV UNet
        unet.fuse_qkv()
    state = random_lora(unet, CONFIG, seed=10)  # conv and linear modules differ in rank and alpha
    if fmt == "peft":
        # diffusers 0.42's kohya path drops alphas of single attention projections (its
        # alpha_pattern keys keep the processor names), so only PEFT gets this one.
        state["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(1.0)
    path = tmp_path / f"lora_final.{fmt}.safetensors"
    (save_kohya if fmt == "kohya" else save_peft)(path, state)
    pipe = tiny_pipeline(base_state, tmp_path)
    base = run(pipe.unet, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    reference = run(pipe.unet, inputs)
    loaded, _ = load_lora_file(path, unet=unet)
    apply_loras(unet, [(loaded, 1.0)])
    assert rel_err(reference, base) > 1e-3
    assert rel_err(run(unet, inputs), reference) < 1e-4


def test_foreign_lora_files_raise_naming_the_file(base_state, tmp_path):
    down, up = torch.zeros(4, 768), torch.zeros(320, 4)
    sd15 = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": up,
    }
    te_only = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(
            4, 768
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    wrong_width = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.zeros(32, 4)}
    cases = [
        ("sd15_meta", sd15, {"ss_base_model_version": "sd_v1"}, "sd_v1"),
        ("sd15", sd15, {}, "input_blocks.1.1"),
        ("te_only", te_only, {}, "text-encoder"),
        ("nothing", {"foo.weight": torch.zeros(2)}, {}, "no known LoRA format"),
        ("loha", {f"{name}.hada_w1_a": torch.zeros(2)}, {}, "LoHa"),  # DoRA: tests/test_dora.py
        ("wide_context", wrong_width, {}, "model's weight is"),
    ]
    unet = ours(base_state)
    for stem, tensors, meta, message in cases:
        path = tmp_path / f"{stem}.safetensors"
        save_file(tensors, path, metadata=meta)
        with pytest.raises(LoRAFileError, match=message) as err:
            load_lora_file(path, unet=unet)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_lora_file(tmp_path / "missing.safetensors")
    mixed = dict(te_only)
    mixed[f"{name}.lora_down.weight"] = torch.zeros(4, 64)
    mixed[f"{name}.lora_up.weight"] = torch.zeros(32, 4)
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.warns(UserWarning, match="text-encoder"):
        state, info = load_lora_file(tmp_path / "mixed.safetensors", unet=unet)
    assert len(info.ignored) == 1 and len(split_lora_state(state)) == 1
