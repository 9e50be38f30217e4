"""DoRA (--lora_type dora): equal to peft's use_dora, merged = unmerged, trained end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdxl.lora import (
    DoRAConv2d,
    DoRALinear,
    LoRAConfig,
    apply_loras,
    inject_lora,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_multiplier,
    unmerge_lora,
)
from sdxl.lora_formats import load_lora_file
from sdxl.lora_formats.kohya import save_kohya
from sdxl.lora_formats.seed import save_seed_pt
from sdxl.models.configs import TINY
from sdxl.models.networks import MODEL_CLASSES
from tests.test_lora import ours, rel_err, run
from tests.test_train import _cfg, small_dataset  # noqa: F401  (fixture)

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

ATTENTION_OUT = r".*attn[12]\.(to_[qkv]|to_out\.0)"  # peft fullmatch = our "attention_out"


def _forward(unet: nn.Module, inputs) -> torch.Tensor:
    """run() with grad: our UNet or diffusers'."""
    sample, t, context, text_embeds, time_ids = inputs
    if hasattr(unet, "add_adapter"):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet(sample, t, context, added_cond_kwargs=added).sample
    return unet(sample, t, context, text_embeds, time_ids)


@torch.no_grad()
def _randomise_peft(model: nn.Module, seed: int) -> None:
    """Non-zero lora_B and magnitudes 0.8-1.2x their init (peft's init is A random, B = 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            mag = m.lora_magnitude_vector["default"].weight
            mag.mul_(0.8 + 0.4 * torch.rand(mag.shape, generator=g))


@torch.no_grad()
def _copy_from_peft(model: nn.Module, reference: nn.Module) -> None:
    """Our DoRA layers take the peft layers' A, B and magnitude (same module paths)."""
    theirs = dict(reference.named_modules())
    for name, layer in lora_modules(model).items():
        p = theirs[name]
        layer.lora_down.weight.copy_(p.lora_A["default"].weight)
        layer.lora_up.weight.copy_(p.lora_B["default"].weight)
        magnitude = p.lora_magnitude_vector["default"].weight  # (out,) or (1, out, 1, 1)
        layer.dora_scale.copy_(magnitude.reshape(layer.dora_scale.shape))


def _peft_grads(reference: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in reference.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            out[f"{name}.lora_down.weight"] = m.lora_A["default"].weight.grad
            out[f"{name}.lora_up.weight"] = m.lora_B["default"].weight.grad
            out[f"{name}.dora_scale"] = m.lora_magnitude_vector["default"].weight.grad
    return out


def _our_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_modules(model).items():
        out[f"{name}.lora_down.weight"] = layer.lora_down.weight.grad
        out[f"{name}.lora_up.weight"] = layer.lora_up.weight.grad
        out[f"{name}.dora_scale"] = layer.dora_scale.grad
    return out


def _assert_grads_match(ours_: dict, theirs: dict) -> None:
    assert ours_.keys() == theirs.keys()
    for key, want in theirs.items():
        got = ours_[key].reshape(want.shape)
        assert want.abs().max() > 0, key
        assert rel_err(got, want) < 1e-4, key


# ----------------------------------------------------------------------------- equal to peft


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 7)  # non-square, with bias
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x, image):
        return self.lin(x).square().sum() + self.conv(image).square().sum()


def test_linear_and_conv_match_peft_forward_and_gradients():
    torch.manual_seed(0)
    base = _Two()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=True)
    reference = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target=("lin$", "conv$"), dora=True))
    assert isinstance(model.lin, DoRALinear) and isinstance(model.conv, DoRAConv2d)
    for name, layer in lora_modules(model).items():  # init: m = ||W|| per output row
        want = getattr(reference, name).lora_magnitude_vector["default"].weight
        assert torch.allclose(layer.dora_scale.flatten(), want.flatten(), rtol=1e-6)
    _randomise_peft(reference, seed=1)
    _copy_from_peft(model, reference)
    x, image = torch.randn(3, 12), torch.randn(2, 3, 6, 6)
    want, got = reference(x, image), model(x, image)
    assert torch.allclose(got, want, rtol=1e-6)
    want.backward()
    got.backward()
    _assert_grads_match(_our_grads(model), _peft_grads(reference))
    assert {id(p) for p in lora_parameters(model)} >= {id(model.lin.dora_scale)}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_qkv"])
def test_tiny_unet_attention_matches_peft(base_state, inputs, fused):
    reference = diffusers.UNet2DConditionModel.from_config(TINY["unet"])
    reference.load_state_dict(base_state, strict=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_OUT, use_dora=True)
    reference.add_adapter(config)
    _randomise_peft(reference, seed=2)
    model = ours(base_state)
    if fused:
        model.fuse_qkv()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target="attention_out", dora=True))
    _copy_from_peft(model, reference)
    want, got = _forward(reference, inputs), _forward(model, inputs)
    assert rel_err(got, want) < 1e-5
    want.square().mean().backward()
    got.square().mean().backward()
    _assert_grads_match(_our_grads(model), _peft_grads(reference))


# ----------------------------------------------------------------------------- merge, multiplier


@pytest.fixture(scope="module")
def dora_state(base_state) -> dict[str, torch.Tensor]:
    """A DoRA state on attention and resnet convs with non-zero up and moved magnitudes."""
    unet = ours(base_state)
    g = torch.Generator().manual_seed(3)
    inject_lora(unet, LoRAConfig(rank=4, alpha=2.0, target="all", conv=True, dora=True), g)
    with torch.no_grad():
        for layer in lora_modules(unet).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)
            layer.dora_scale.mul_(0.8 + 0.4 * torch.rand(layer.dora_scale.shape, generator=g))
    state = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    remove_lora(unet)
    return state


def test_merge_equals_unmerged_and_multiplier_interpolates(base_state, dora_state, inputs):
    unet = ours(base_state)
    base = run(unet, inputs)
    apply_loras(unet, [(dora_state, 1.0)])
    assert any(isinstance(m, DoRAConv2d) for m in lora_modules(unet).values())
    full = run(unet, inputs)
    assert rel_err(full, base) > 1e-2
    merge_lora(unet)
    assert rel_err(run(unet, inputs), full) < 1e-5
    unmerge_lora(unet)
    set_lora_multiplier(unet, 0.0)  # 0 = off, as ComfyUI's strength
    assert rel_err(run(unet, inputs), base) < 1e-6
    set_lora_multiplier(unet, 0.5)
    half = run(unet, inputs)
    merge_lora(unet)
    assert rel_err(run(unet, inputs), half) < 1e-5
    remove_lora(unet)  # unmerges: the base weights are back
    for key, value in unet.state_dict().items():
        assert torch.allclose(value, base_state[key], atol=1e-6), key


def test_stacking_a_dora_with_another_lora_on_one_module_is_refused(base_state, dora_state):
    unet, state = ours(base_state), dora_state
    plain = {k: v for k, v in state.items() if not k.endswith(".dora_scale")}
    with pytest.raises(ValueError, match="cannot be stacked"):
        apply_loras(unet, [(plain, 1.0), (state, 1.0)])
    inject_lora(unet, LoRAConfig(rank=4, alpha=2.0, target="all", conv=True))
    with pytest.raises(ValueError, match="the layer is plain LoRA, the state is DoRA"):
        load_lora_state_dict(unet, state)


def test_kohya_and_seed_files_round_trip(dora_state, tmp_path):
    state = dora_state
    save_kohya(tmp_path / "dora.safetensors", state)
    linear = {k: v for k, v in state.items() if split(k) not in convs(state)}
    save_seed_pt(tmp_path / "dora.pt", linear)  # the seed's format holds Linears only
    with safe_open(str(tmp_path / "dora.safetensors"), "pt") as f:
        meta = f.metadata()
        name = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"  # SGM names
        assert f.get_tensor(f"{name}.dora_scale").shape == (256, 1)  # LyCORIS wd_on_output
        conv = "lora_unet_input_blocks_4_0_in_layers_2"
        assert f.get_tensor(f"{conv}.dora_scale").shape == (32, 1, 1, 1)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert args["dora_wd"] == "True" and args["algo"] == "locon"
    for path, saved in (("dora.safetensors", state), ("dora.pt", linear)):
        loaded, _ = load_lora_file(tmp_path / path)
        assert loaded.keys() == saved.keys(), path
        for key, value in saved.items():
            assert torch.allclose(loaded[key].float(), value, atol=1e-6), (path, key)


def split(key: str) -> str:
    return key.rsplit(".lora_", 1)[0].removesuffix(".alpha").removesuffix(".dora_scale")


def convs(state: dict[str, torch.Tensor]) -> set[str]:
    return {split(k) for k, v in state.items() if k.endswith(".lora_down.weight") and v.ndim == 4}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dora_run(tiny_dir, small_dataset, tmp_path_factory):  # noqa: F811
    """Two optimizer steps of `train_sdxl.py --lora_type dora` on the tiny model."""
    from sdxl.cli.train import main

    out = tmp_path_factory.mktemp("dora-run")
    argv = ["--data_dir", str(small_dataset), "--pretrained_model", str(tiny_dir),
            "--output_dir", str(out), "--image_size", "64", "--batch_size", "2",
            "--max_steps", "2", "--precision", "fp32", "--device", "cpu", "--lora_rank", "4",
            "--lora_alpha", "4", "--learning_rate", "1e-3", "--seed", "5",
            "--no-gradient_checkpointing", "--prediction_type", "epsilon",
            "--timestep_max", "1000", "--lora_type", "dora"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_training_writes_dora_that_diffusers_applies_like_us(dora_run, tiny_dir, inputs):
    """The trained file's dora_scale keys, through diffusers' kohya converter into peft."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    from sdxl.weights import load_component

    path = dora_run / "lora_final.safetensors"
    tensors = load_file(str(path))
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    scales = [k for k in tensors if k.endswith(".dora_scale")]
    assert len(scales) == len(downs) > 0
    unet = load_component(
        tiny_dir, "unet", model_cls=MODEL_CLASSES["unet"], dtype=torch.float32, device="cpu"
    ).eval()
    weights = dict(unet.named_modules())
    state, _ = load_lora_file(path, unet)
    moved = [k for k in state if k.endswith(".dora_scale")
             and not torch.allclose(state[k].flatten(),
                                    weights[k.removesuffix(".dora_scale")].weight.flatten(1)
                                    .norm(dim=1))]  # fmt: skip
    assert moved, "training did not change any DoRA magnitude"
    assert json.loads(_header(path)["ss_network_args"])["dora_wd"] == "True"

    reference = diffusers.UNet2DConditionModel.from_config(TINY["unet"]).eval()
    reference.load_state_dict(unet.state_dict(), strict=True)
    base = run(reference, inputs)
    # diffusers 0.42's SDXL load_lora_weights drops dora_scale (it warns); its kohya converter
    # maps it to peft's lora_magnitude_vector, which peft holds as (out,): LyCORIS's (out, 1)
    # (what ComfyUI needs) is reshaped for it here.
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(dict(tensors), reference.config)
    )
    converted = {k: v.flatten() if "lora_magnitude_vector" in k else v
                 for k, v in converted.items()}  # fmt: skip
    diffusers.StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, unet=reference)
    want = run(reference, inputs)
    apply_loras(unet, [(state, 1.0)])
    assert rel_err(want, base) > 1e-4
    assert rel_err(run(unet, inputs), want) < 1e-5


def _header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_resumed_dora_run_equals_the_straight_one(dora_run, tiny_dir, tmp_path):
    from sdxl.train.loop import train
    from tests.interrupt import killed_after_step

    kw = dict(max_steps=2, num_epochs=10, lora_type="dora", checkpoint_steps=1)
    resumed = tmp_path / "resumed"
    with killed_after_step(1):
        train(_cfg(tiny_dir, dora_run / "cache", resumed, **kw))
    train(_cfg(tiny_dir, dora_run / "cache", resumed, **kw))
    want, got = (
        load_file(str(dora_run / "lora_final.safetensors")),
        load_file(str(resumed / "lora_final.safetensors")),
    )
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_lora_type_is_checked_and_peft_export_refuses_dora(dora_state):
    from sdxl.lora_formats.peft import state_to_peft
    from sdxl.train.config import TrainConfig

    with pytest.raises(ValueError, match="lora_type must be one of"):
        TrainConfig(data_dir="x", lora_type="loha")
    with pytest.raises(ValueError, match="written as kohya"):
        state_to_peft(dora_state)


def test_pipeline_config_trains_dora_and_reruns_training_on_a_change():
    from sdxl.train.config import RUNTIME_SETTINGS
    from tests.test_presets import checked, merged, train_config

    config = merged()
    config["train"]["lora_type"] = "dora"
    assert train_config(checked(config)).lora_type == "dora"
    assert "lora_type" not in RUNTIME_SETTINGS  # learned: the workflow reruns training
    config["train"]["lora_type"] = "loha"
    with pytest.raises(Exception, match="loha"):
        checked(config)
