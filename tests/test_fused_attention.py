"""Fused QKV/KV projections and selective checkpointing against the plain UNet (CPU, tiny, fp32)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from sdxl.lora import (
    LoRAConfig,
    apply_loras,
    inject_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
)
from sdxl.lora_formats import load_lora_file
from sdxl.lora_formats.kohya import save_kohya
from sdxl.models import unet as unet_module
from sdxl.models.configs import TINY, UNetConfig
from sdxl.models.unet import KV, QKV, Attention, UNet2DConditionModel
from tests.test_lora import rel_err


def build(state: dict[str, torch.Tensor], fused: bool) -> UNet2DConditionModel:
    """A tiny UNet loaded strictly from `state` (diffusers names), then fused if asked."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"])).eval()
    unet.load_state_dict(state, strict=True)
    if fused:
        unet.fuse_qkv()
    return unet


def attentions(unet: UNet2DConditionModel) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention)]


def shares_one_tensor(attn: Attention) -> bool:
    """Every fused projection's weight lives in the attention's fused_weight."""
    base = attn.fused_weight.untyped_storage().data_ptr()
    return all(getattr(attn, n).weight.untyped_storage().data_ptr() == base for n in attn.fused)


@torch.no_grad()
def run(unet: UNet2DConditionModel, inputs) -> torch.Tensor:
    dtype = unet.conv_in.weight.dtype
    return unet(*(t.to(dtype) if t.is_floating_point() else t for t in inputs))


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def read_file(path) -> tuple[dict[str, str], list[tuple[str, str, tuple, bytes]]]:
    """A safetensors file's metadata and tensors, byte for byte (its header order is not fixed)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = [(k, f.get_tensor(k)) for k in f.keys()]  # noqa: SIM118
        meta = f.metadata()
    return meta, [(k, str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for k, t in tensors]


def add_lora(unet: UNet2DConditionModel, config: LoRAConfig, seed: int) -> None:
    """Inject a LoRA (down matrices from `seed`) with random non-zero up matrices (seed + 1), so
    that it changes the output from the first step."""
    inject_lora(unet, config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_modules(unet).values():
            w = layer.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def test_fused_state_dict_is_the_checkpoint(base_state, inputs, tmp_path):
    plain, fused = build(base_state, False), build(base_state, True)
    assert [a.fused for a in attentions(fused)] == [QKV, KV] * (len(attentions(fused)) // 2)
    assert all(shares_one_tensor(a) for a in attentions(fused))
    state = fused.state_dict()
    assert list(state) == list(base_state)  # same keys in the same order: no fused_weight
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    assert rel_err(run(fused, inputs), run(plain, inputs)) < 1e-6

    save_file(state, tmp_path / "unet.safetensors")  # slices of one tensor save as separate keys
    assert (
        rel_err(
            run(build(load_file(tmp_path / "unet.safetensors"), False), inputs), run(plain, inputs)
        )
        < 1e-6
    )

    other = perturbed(base_state, seed=2)
    expected = run(build(other, False), inputs)
    fused.load_state_dict(other)  # copies into the views
    assert rel_err(run(fused, inputs), expected) < 1e-6
    fused.load_state_dict(perturbed(base_state, seed=3), assign=True)  # new tensors: packed again
    assert all(shares_one_tensor(a) for a in attentions(fused))
    assert (
        rel_err(run(fused, inputs), run(build(perturbed(base_state, seed=3), False), inputs)) < 1e-6
    )
    fused.double()
    assert all(
        shares_one_tensor(a) and a.fused_weight.dtype == torch.float64 for a in attentions(fused)
    )

    with pytest.raises(ValueError, match="already fused"):
        fused.fuse_qkv()
    with pytest.raises(ValueError, match="fused for self-attention"):
        attentions(fused)[0](torch.randn(1, 4, 16).double(), torch.randn(1, 3, 16).double())


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(rank=4, alpha=8.0, target="all"),
        LoRAConfig(rank=3, alpha=1.5, target=(r"attn1\.to_[qv]$", r"attn2\.to_k$")),
    ],
    ids=["all", "partial-groups"],
)
def test_fused_lora_training_matches_unfused(base_state, inputs, tmp_path, config):
    models = {"plain": build(base_state, False), "fused": build(base_state, True)}
    target = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    grads, states = {}, {}
    for kind, unet in models.items():
        add_lora(unet, config, seed=3)
        states[kind] = {k: v.clone() for k, v in lora_state_dict(unet).items()}
        save_kohya(tmp_path / kind / "lora_final.safetensors", states[kind])
        params = lora_parameters(unet)
        unet.train()
        (unet(*inputs) - target).square().mean().backward()
        grads[kind] = [p.grad.clone() for p in params]
    plain_file, fused_file = (
        read_file(tmp_path / kind / "lora_final.safetensors") for kind in models
    )
    assert fused_file == plain_file  # same header, names, dtypes, shapes and bytes
    assert list(states["plain"]) == list(states["fused"])
    for g_plain, g_fused in zip(grads["plain"], grads["fused"], strict=True):
        assert rel_err(g_fused, g_plain) < 1e-5


def test_dropout_lora_on_fused_model_draws_the_same_masks(base_state, inputs):
    outputs = []
    for fused in (False, True):
        unet = build(base_state, fused)
        add_lora(unet, LoRAConfig(rank=2, dropout=0.5), seed=3)
        unet.train()
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(unet(*inputs))
    assert rel_err(outputs[1], outputs[0]) < 1e-6


def test_foreign_kohya_lora_on_fused_model(base_state, inputs, tmp_path):
    """Per-projection ranks and alphas differ and a group is partly covered, as in the wild."""
    donor = build(base_state, False)
    add_lora(donor, LoRAConfig(rank=4, alpha=8.0, target="attention"), seed=1)
    state = {k: v.clone() for k, v in lora_state_dict(donor).items()}
    block = "mid_block.attentions.0.transformer_blocks.0"
    g = torch.Generator().manual_seed(6)
    state[f"{block}.attn1.to_k.lora_down.weight"] = torch.randn(2, 32, generator=g)
    state[f"{block}.attn1.to_k.lora_up.weight"] = torch.randn(32, 2, generator=g)
    state[f"{block}.attn1.to_k.alpha"] = torch.tensor(1.0)
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        del state[f"{block}.attn1.to_v.{suffix}"]
    save_kohya(tmp_path / "foreign.safetensors", state)

    plain, fused = build(base_state, False), build(base_state, True)
    base_out = run(plain, inputs)
    loaded, info = load_lora_file(tmp_path / "foreign.safetensors", unet=fused)
    assert info.ranks[f"{block}.attn1.to_k"] == 2
    loras = [(loaded, 0.7), (state, -0.4)]
    apply_loras(plain, loras)
    apply_loras(fused, loras)
    expected = run(plain, inputs)
    assert rel_err(expected, base_out) > 1e-3
    assert rel_err(run(fused, inputs), expected) < 1e-5
    merge_lora(fused)
    assert rel_err(run(fused, inputs), expected) < 1e-5
    remove_lora(fused)  # unmerges into the shared tensor
    assert rel_err(run(fused, inputs), base_out) < 1e-6
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, base_state[key], rtol=0, atol=1e-6)


class _CountAttention(TorchDispatchMode):
    """Counts the SDPA kernel calls (forward ones; recomputation included)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in unet_module._ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_attention_and_same_grads(base_state, inputs):
    unet = build(base_state, True)
    add_lora(unet, LoRAConfig(rank=4, alpha=8.0, target="attention_out"), seed=3)
    unet.train()
    params = lora_parameters(unet)
    grads, calls = {}, {}
    for mode in ("none", "full", "selective"):
        unet.set_gradient_checkpointing(mode)
        unet.zero_grad(set_to_none=True)
        with _CountAttention() as counter:
            unet(*inputs).square().mean().backward()
        grads[mode], calls[mode] = [p.grad.clone() for p in params], counter.calls
    n = len(attentions(unet))
    assert calls == {"none": n, "full": 2 * n, "selective": n}  # selective never reruns SDPA
    for mode in ("full", "selective"):
        for g, g0 in zip(grads[mode], grads["none"], strict=True):
            assert rel_err(g, g0) < 1e-6
    unet.set_gradient_checkpointing(True)
    assert {m.checkpointing for m in unet.modules() if hasattr(m, "checkpointing")} == {"full"}
    with pytest.raises(ValueError, match="selective"):
        unet.set_gradient_checkpointing("some")


def test_fused_base_weights_get_their_gradients(base_state, inputs):
    """Training the base itself (not LoRA) still gives every projection Parameter its gradient."""
    grads = []
    for fused in (False, True):
        unet = build(base_state, fused).requires_grad_(True)
        unet(*inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters()})
    assert grads[1].keys() == grads[0].keys()
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-5, name
