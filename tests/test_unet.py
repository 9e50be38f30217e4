"""Parity of sdxl.models.unet against diffusers' UNet2DConditionModel (CPU, tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from safetensors.torch import load_file

from sdxl.models import unet as unet_module
from sdxl.models.configs import SDXL_BASE, TINY, UNetConfig, component_config
from sdxl.models.unet import UNet2DConditionModel

SDXL_UNET_PARAMS = 2_567_463_684

# Another member of the family: other widths, depths, heads, text and size-embedding widths,
# per-level layers_per_block and an SD1.x-like block order (attention in the upper levels).
OTHER = {
    **component_config(SDXL_BASE, "unet"),
    "block_out_channels": [24, 48, 48],
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [3, 2, 4],
    "cross_attention_dim": 40,
    "addition_time_embed_dim": 6,
    "projection_class_embeddings_input_dim": 20 + 6 * 6,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 3,
    "out_channels": 5,
}
# Four levels (overall factor 8), int depth and heads.
FOUR_LEVELS = {
    **component_config(TINY, "unet"),
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 2,
    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def perturbed_reference(cfg: dict, seed: int = 0) -> DiffusersUNet:
    """diffusers' UNet with a seeded init plus noise on every weight (no all-ones/zeros norms)."""
    torch.manual_seed(seed)
    ref = DiffusersUNet.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


def ours_from(ref_sd: dict, cfg: dict) -> UNet2DConditionModel:
    """Our UNet built from the config dict, loaded strictly from a diffusers state dict."""
    model = UNet2DConditionModel(UNetConfig.from_dict(cfg)).eval()
    model.load_state_dict(ref_sd, strict=True)
    return model


def make_inputs(cfg: dict, batch: int, h: int, w: int, seed: int = 0) -> dict:
    """Random sample, text context, pooled text and size/crop ids matching a config."""
    g = torch.Generator().manual_seed(seed)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {
        "sample": torch.randn(batch, cfg["in_channels"], h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
        "text_embeds": torch.randn(batch, pooled, generator=g),
        "time_ids": torch.tensor([[1024.0, 768.0, 12.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
        + torch.arange(batch)[:, None],
    }


def run_both(ours, ref, inputs: dict, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of our UNet and of diffusers' on the same inputs."""
    with torch.no_grad():
        a = ours(**inputs, timestep=timestep)
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        b = ref(
            inputs["sample"],
            timestep,
            inputs["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample
    return a, b


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = TINY["unet"]
    ref = perturbed_reference(cfg)
    return ours_from(ref.state_dict(), cfg), ref


@pytest.mark.parametrize(
    "timestep",
    [
        torch.tensor([3, 701]),
        torch.tensor([0.25, 999.0]),
        torch.tensor(500),
        500,
        417.3719,
        torch.tensor(12.5),
    ],
    ids=["per-sample-int", "per-sample-float", "0d", "int", "fractional", "0d-fractional"],
)
def test_tiny_matches_diffusers_timesteps(tiny_pair, timestep):
    ours, ref = tiny_pair
    a, b = run_both(ours, ref, make_inputs(TINY["unet"], 2, 8, 8), timestep)
    assert a.shape == (2, 4, 8, 8)
    assert b.abs().max() > 0.1  # a real signal, not a zero-initialised output
    assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("size", [(8, 12), (9, 13), (5, 6)])
def test_tiny_matches_diffusers_sizes(tiny_pair, size):
    ours, ref = tiny_pair
    a, b = run_both(ours, ref, make_inputs(TINY["unet"], 2, *size, seed=1), torch.tensor([10, 900]))
    assert a.shape == (2, 4, *size)
    assert rel_err(a, b) < 1e-4


def test_timestep_matters(tiny_pair):
    """Guard against a test that passes because the time path is ignored."""
    ours, _ = tiny_pair
    inputs = make_inputs(TINY["unet"], 2, 8, 8)
    with torch.no_grad():
        assert rel_err(ours(**inputs, timestep=10), ours(**inputs, timestep=900)) > 1e-2


@pytest.mark.parametrize("cfg", [OTHER, FOUR_LEVELS], ids=["other", "four-levels"])
def test_other_configs_from_saved_diffusers_folder(tmp_path, cfg):
    perturbed_reference(cfg, seed=3).save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours = ours_from(sd, saved_cfg)
    ref = DiffusersUNet.from_pretrained(tmp_path).eval()
    for size in [(16, 16), (9, 13)]:
        a, b = run_both(
            ours, ref, make_inputs(saved_cfg, 2, *size, seed=2), torch.tensor([5, 640.5])
        )
        assert a.shape == (2, saved_cfg["out_channels"], *size)
        assert rel_err(a, b) < 1e-4


def test_sdxl_on_meta_matches_diffusers_keys_and_count():
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(SDXL_BASE["unet"]))
        ref = DiffusersUNet.from_config(SDXL_BASE["unet"])
    assert sum(p.numel() for p in ours.parameters()) == SDXL_UNET_PARAMS
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert not list(ours.buffers())  # nothing the checkpoint does not hold


def test_meta_model_loads_with_assign(tiny_pair):
    _, ref = tiny_pair
    with torch.device("meta"):
        model = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"]))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    inputs = make_inputs(TINY["unet"], 1, 8, 8)
    a, b = run_both(model.eval(), ref, {k: v[:1] for k, v in inputs.items()}, 321)
    assert rel_err(a, b) < 1e-4


def _loss_and_grads(model: UNet2DConditionModel, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, timestep=torch.tensor([100, 800])).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads(tiny_pair, monkeypatch):
    ours, _ = tiny_pair
    model = UNet2DConditionModel(ours.config)
    model.load_state_dict(ours.state_dict())
    model.train()
    inputs = make_inputs(TINY["unet"], 2, 8, 8)
    loss_plain, grads_plain = _loss_and_grads(model, inputs)

    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_gradient_checkpointing(True)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs)

    layers = [m for m in model.modules() if isinstance(m, unet_module.ResnetBlock2D)]
    layers += [m for m in model.modules() if isinstance(m, unet_module.BasicTransformerBlock)]
    assert len(calls) == len(layers)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6, atol=0)
    for name, g in grads_plain.items():
        assert rel_err(grads_ckpt[name], g) < 1e-5, name

    calls.clear()
    with torch.no_grad():
        model.eval()(**inputs, timestep=5)
    assert not calls  # eval never checkpoints


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_forward_close_to_fp32(tiny_pair, dtype):
    ours, _ = tiny_pair
    inputs = make_inputs(TINY["unet"], 2, 8, 12)
    low = UNet2DConditionModel(ours.config).eval()
    low.load_state_dict(ours.state_dict())
    low.to(dtype)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        ref = ours(**inputs, timestep=t)
        out = low(**{k: v.to(dtype) for k, v in inputs.items()}, timestep=t)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-2
