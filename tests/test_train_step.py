"""The training step (sdxl/train/step.py): compiles whole without breaks or recompiles, equals
eager, padding changes nothing, a non-finite step is skipped on the device."""

from __future__ import annotations

import json

import torch

from sdxl.models.configs import TINY, UNetConfig
from sdxl.models.unet import UNet2DConditionModel
from sdxl.train.config import TrainConfig
from sdxl.train.data_order import step_generator
from sdxl.train.distributed import DistInfo
from sdxl.train.loss import draw_step_noise, per_sample_loss

# The tiny UNet with one resnet and one transformer layer per block: the same code paths, half
# the modules, so each compile in these tests traces in half the time.
UNET = {**TINY["unet"], "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]}
CPU = torch.device("cpu")
BUCKETS = ((4, 8, 8), (4, 8, 12))  # latents of 64x64 and 96x64 px


def _cfg(**kw) -> TrainConfig:
    base = dict(data_dir="-", batch_size=2, precision="fp32", lora_rank=4, lora_alpha=4.0,
                learning_rate=1e-3, gradient_checkpointing=False, prediction_type="epsilon",
                timestep_max=1000, compile=False, caption_dropout=0.3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _step(tiny_dir, cfg: TrainConfig, backend: str = "aot_eager"):
    """A fresh tiny UNet with the same LoRA init, and the trainer's TrainStep over it."""
    from sdxl.lora import LoRAConfig, inject_lora, lora_parameters
    from sdxl.noise_schedule import NoiseSchedule
    from sdxl.train.optim import make_optimizer
    from sdxl.train.step import TrainStep

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(UNetConfig.from_dict(UNET))
        inject_lora(unet, LoRAConfig(rank=4, alpha=4.0))
        for name, p in unet.named_parameters():  # LoRA B off zero, so A gets gradients too
            if "lora_up" in name:
                p.data.normal_(std=0.1)
    unet.train()
    params = lora_parameters(unet)
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    empty = (torch.zeros(77, UNET["cross_attention_dim"]), torch.zeros(_pooled_dim()))
    step = TrainStep(unet, params, make_optimizer(params, cfg), NoiseSchedule.from_config(sched),
                     cfg, DistInfo(0, 1, CPU), per_sample_loss, empty, backend=backend)  # fmt: skip
    return step, params


def _pooled_dim() -> int:
    return UNET["projection_class_embeddings_input_dim"] - 6 * UNET["addition_time_embed_dim"]


def _rows(shape: tuple[int, ...], real: int, per_rank: int, seed: int) -> dict:
    """Host rows as read_rows makes them: `real` random samples, then zero padding rows."""
    g = torch.Generator().manual_seed(seed)
    n = per_rank

    def rand(*s):  # the real rows do not depend on the padding
        return torch.cat([torch.randn((real, *s), generator=g), torch.zeros((n - real, *s))])

    h, w = shape[1] * 8, shape[2] * 8
    ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(n, 1)
    rows = {"mean": rand(*shape), "std": rand(*shape).abs() * 0.1, "time_ids": ids,
            "mean_flip": rand(*shape), "std_flip": rand(*shape).abs() * 0.1,
            "time_ids_flip": ids.clone(), "prompt_embeds": rand(77, UNET["cross_attention_dim"]),
            "pooled": rand(_pooled_dim()), "weight": torch.zeros(n)}  # fmt: skip
    rows["weight"][:real] = 1.0 / real
    return rows


def _run(step, cfg, schedule: list[tuple[int, int]], real: int | None = None) -> list:
    """train_step over (bucket, batch index) pairs; returns the StepResults."""
    from sdxl.train.step import train_step

    out = []
    for bucket, batch in schedule:
        shape = BUCKETS[bucket]
        rows = _rows(shape, real or cfg.batch_size, cfg.batch_size, seed=batch)
        rnd = draw_step_noise(step_generator(7, 0, batch), cfg.batch_size, shape, cfg)
        out.append(train_step(step, [step.stage(rows, rnd)]))
    return out


SCHEDULE = [(0, 0), (1, 1), (0, 2), (1, 3)]


def _eager_and_compiled(tiny_dir, backend: str, schedule: list[tuple[int, int]], warm: int):
    """(results, LoRA weights) of eager and of compiled steps over `schedule`; after the first
    `warm` steps (one per bucket) a recompile is an error. Also returns dynamo's counters."""
    from torch._dynamo.utils import counters

    results, weights = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = _cfg(compile=compiled)
        step, params = _step(tiny_dir, cfg, backend)
        out = _run(step, cfg, schedule[:warm])
        with torch._dynamo.config.patch(error_on_recompile=True):
            out += _run(step, cfg, schedule[warm:])
        results.append(out)
        weights.append([p.detach().clone() for p in params])
    return results, weights, counters


def _assert_equal_runs(results, weights) -> None:
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp.losses, eager.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comp.grad_norm, eager.grad_norm, rtol=1e-5, atol=1e-7)
    for eager, comp in zip(*weights, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-7)


def test_compiled_step_has_no_breaks_or_recompiles_over_two_buckets(tiny_dir):
    """fullgraph=True (a break would raise), one graph per bucket, nothing recompiles after a
    step per bucket, results equal eager's. Dynamo alone (backend "eager"): the graph capture
    and its guards are what this checks; AOTAutograd is checked below on one bucket."""
    results, weights, counters = _eager_and_compiled(tiny_dir, "eager", SCHEDULE, warm=2)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(BUCKETS)
    _assert_equal_runs(results, weights)


def test_compiled_step_through_aot_autograd_equals_eager(tiny_dir):
    """The compiled forward and backward (aot_eager: inductor's graphs, eager kernels) give
    eager's losses, gradient norms and LoRA weights in fp32 (one bucket: each costs ~20 s)."""
    schedule = [(0, 0), (0, 2)]
    results, weights, counters = _eager_and_compiled(tiny_dir, "aot_eager", schedule, warm=1)
    assert not counters["graph_break"], dict(counters["graph_break"])
    _assert_equal_runs(results, weights)


def test_padding_rows_add_nothing(tiny_dir):
    """A short batch padded to 3 rows equals it unpadded; padding content cannot leak in."""
    outs = []
    for per_rank, junk in ((2, False), (3, False), (3, True)):
        cfg = _cfg(batch_size=per_rank)
        step, params = _step(tiny_dir, cfg)
        rows = _rows(BUCKETS[0], real=2, per_rank=per_rank, seed=1)
        if junk:  # weight-0 rows of garbage must still contribute exactly zero
            rows = {k: v.clone() for k, v in rows.items()}
            for k in ("mean", "mean_flip", "prompt_embeds", "pooled"):
                rows[k][2:] = torch.randn_like(rows[k][2:]) * 10
        rnd = draw_step_noise(step_generator(7, 0, 0), 3, BUCKETS[0], cfg)  # the global draw
        from sdxl.train.step import train_step

        result = train_step(step, [step.stage(rows, rnd)])
        outs.append((result.losses[0, :2], result.grad_norm, [p.detach().clone() for p in params]))
    (loss2, norm2, w2), (loss3, norm3, w3), (loss_junk, norm_junk, w_junk) = outs
    torch.testing.assert_close(loss3, loss2, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm3, norm2, rtol=1e-5, atol=0)
    for a, b in zip(w3, w2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert torch.equal(norm_junk, norm3)
    assert all(torch.equal(a, b) for a, b in zip(w_junk, w3, strict=True))


def test_non_finite_step_is_skipped_on_the_device(tiny_dir):
    """NaN input: flag set, weights, optimizer state and step count untouched; then it trains."""
    from sdxl.train.step import train_step

    cfg = _cfg()
    step, params = _step(tiny_dir, cfg)
    grads = [p.grad.data_ptr() for p in params]
    _run(step, cfg, [(0, 0)])
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in step.optimizer.state[params[0]].items()}
    rows = _rows(BUCKETS[0], 2, 2, seed=3)
    rows["mean"][1] = float("nan")
    rows["mean_flip"][1] = float("nan")
    rnd = draw_step_noise(step_generator(7, 0, 9), 2, BUCKETS[0], cfg)
    bad = train_step(step, [step.stage(rows, rnd)])
    assert bad.skipped.item() == 1.0 and not torch.isfinite(bad.losses[0, 1])
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(torch.equal(v, step.optimizer.state[params[0]][k]) for k, v in state.items())
    good = _run(step, cfg, [(0, 1)])[0]
    assert good.skipped.item() == 0.0 and not torch.equal(before[0], params[0])
    assert [p.grad.data_ptr() for p in params] == grads  # the flat buffer's views survive
