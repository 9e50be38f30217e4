"""LoRA training on the tiny model: it learns, bf16 updates survive, resume and DDP are exact."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl.train.config import TrainConfig
from sdxl.train.loop import StopTraining, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Twelve captioned images of the bundled example set."""
    folder = tmp_path_factory.mktemp("data") / "shapes"
    folder.mkdir()
    images = sorted(p for p in (ROOT / "examples" / "shapes").iterdir() if p.suffix != ".txt")[:12]
    for image in images:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tiny_dir, small_dataset, tmp_path_factory) -> Path:
    """Caches built once by a short run; later runs pass them as --data_dir."""
    out = tmp_path_factory.mktemp("cache-run")
    train(_cfg(tiny_dir, small_dataset, out, max_steps=1))
    return out / "cache"


def _cfg(tiny_dir, data, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(data), pretrained_model=str(tiny_dir), output_dir=str(out),
                image_size=64, batch_size=2, num_epochs=2, precision="fp32", device="cpu",
                lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, log_interval=1, seed=5,
                gradient_checkpointing=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "lora_final.safetensors"))


def test_outputs_and_metrics(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, cache_dir, out, validation_prompts=("a red circle", "a blue square"),
               validation_interval=2, num_validation_images=2, validation_steps=2,
               max_steps=4)  # fmt: skip
    train(cfg)
    for name in ("lora_final.pt", "lora_final.safetensors", "checkpoint_final.pt", "config.json",
                 "metrics.csv"):  # fmt: skip
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-0000002.png",
        "step-0000004.png",
    ]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == 1e-3 for r in rows)
    lora = torch.load(out / "lora_final.pt", weights_only=True)
    assert lora


def _eval_loss(tiny_dir, cache_dir, lora_file: Path | None) -> float:
    """Mean loss over the training set with fixed noise and timesteps (so runs compare exactly)."""
    from sdxl.data.cache import CachedDataset
    from sdxl.lora import apply_loras
    from sdxl.lora_formats import load_lora_file
    from sdxl.schedulers import NoiseSchedule
    from sdxl.train.loss import draw_step_noise, per_sample_loss
    from sdxl.weights import load_component

    unet = load_component(tiny_dir, "unet", dtype=torch.float32, device="cpu")
    if lora_file is not None:
        apply_loras(unet, [(load_lora_file(lora_file, unet)[0], 1.0)])
    data = CachedDataset(cache_dir / "latents", cache_dir / "text")
    schedule = NoiseSchedule.from_config(
        json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    )
    cfg = _cfg(tiny_dir, cache_dir, "unused")
    empty_embeds, empty_pooled = data.empty_text()
    losses = []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            batch = {
                k: item[k][None] for k in ("mean", "std", "prompt_embeds", "pooled", "time_ids")
            }
            batch["empty_embeds"], batch["empty_pooled"] = empty_embeds[None], empty_pooled[None]
            for k in range(4):
                rnd = draw_step_noise(
                    torch.Generator().manual_seed(100 * i + k), 1, tuple(item["mean"].shape), cfg
                )
                losses.append(per_sample_loss(unet, batch, rnd, schedule, cfg, torch.float32))
    return torch.cat(losses).mean().item()


def test_loss_goes_down(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "learn"
    train(_cfg(tiny_dir, cache_dir, out, num_epochs=10, learning_rate=3e-3, lora_rank=8,
               lora_target_mode="all"))  # fmt: skip
    before = _eval_loss(tiny_dir, cache_dir, None)
    after = _eval_loss(tiny_dir, cache_dir, out / "lora_final.safetensors")
    assert after < 0.97 * before, (before, after)


def test_bf16_base_lora_updates_are_not_lost(tiny_dir, cache_dir, tmp_path):
    """The original project kept LoRA in bf16 and lost most updates to rounding."""
    out = tmp_path / "bf16"
    train(_cfg(tiny_dir, cache_dir, out, precision="bf16", learning_rate=1e-4, max_steps=3))
    state = torch.load(out / "checkpoint_final.pt", weights_only=True)["lora"]
    downs = {k: v for k, v in state.items() if k.endswith("lora_down.weight")}
    ups = {k: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(v.abs().max() > 0 for v in ups.values()), "B never moved off zero"
    from sdxl.lora import LoRAConfig, inject_lora, lora_state_dict
    from sdxl.weights import load_component

    unet = load_component(tiny_dir, "unet", dtype=torch.bfloat16, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        inject_lora(unet, LoRAConfig(rank=4, alpha=4.0))
    init = lora_state_dict(unet)
    changed = [k for k in downs if not torch.equal(downs[k], init[k])]
    assert len(changed) == len(downs), "some LoRA A matrices did not change"


def test_resume_twice_gives_the_same_lora(tiny_dir, cache_dir, tmp_path):
    kw = dict(checkpoint_steps=2, num_epochs=3, caption_dropout=0.3, noise_offset=0.05)
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, cache_dir, straight, **kw))
    resumed = tmp_path / "resumed"
    for stop in (3, 7):
        with pytest.raises(StopTraining):
            train(_cfg(tiny_dir, cache_dir, resumed, **kw), stop_after=stop)
    assert (resumed / "checkpoints" / "checkpoint-step0000006.pt").is_file()
    train(_cfg(tiny_dir, cache_dir, resumed, **kw))
    want, got = _lora(straight), _lora(resumed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    steps = [int(r["step"]) for r in csv.DictReader((resumed / "metrics.csv").open())]
    assert steps == sorted(set(steps))  # rows past the resume point were dropped, not repeated


def test_ddp_two_processes_equal_one(tiny_dir, cache_dir, tmp_path):
    args = ["--data_dir", str(cache_dir), "--pretrained_model", str(tiny_dir), "--image_size", "64",
            "--batch_size", "4", "--num_epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3", "--seed", "5",
            "--no-gradient_checkpointing", "--log_interval", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "ddp"
    script = str(ROOT / "train_sdxl.py")
    subprocess.run(
        [sys.executable, script, *args, "--output_dir", str(single)], check=True, env=env
    )
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29611", script, *args, "--output_dir", str(double)],
                   check=True, env=env)  # fmt: skip
    want, got = _lora(single), _lora(double)
    assert want.keys() == got.keys()
    for k in want:  # equal up to the order of float sums, which Adam amplifies for tiny grads
        rel = (got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-12)
        assert rel < 1e-3, (k, rel)
    # Adam hides a wrong gradient scale; the logged global loss and gradient norm do not.
    rows = [list(csv.DictReader((out / "metrics.csv").open())) for out in (single, double)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4 * abs(float(a[key])), (key, a, b)


def test_lr_schedules_warm_up_from_the_first_step():
    from sdxl.train.optim import lr_at

    def lrs(kind):
        return [
            lr_at(s, _cfg("t", "d", "o", lr_scheduler=kind, warmup_steps=4), 12)
            for s in range(1, 13)
        ]

    assert lrs("constant")[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lrs("linear")[-1] == pytest.approx(0.0) and lrs("linear")[7] == pytest.approx(5e-4)
    assert lrs("cosine")[7] == pytest.approx(5e-4) and lrs("cosine")[-1] == pytest.approx(0.0)


def test_caption_dropout_trains_on_the_empty_caption(tiny_dir, cache_dir):
    from sdxl.data.cache import CachedDataset
    from sdxl.schedulers import NoiseSchedule
    from sdxl.train.loss import draw_step_noise, per_sample_loss
    from sdxl.weights import load_component

    unet = load_component(tiny_dir, "unet", dtype=torch.float32, device="cpu")
    data = CachedDataset(cache_dir / "latents", cache_dir / "text")
    schedule = NoiseSchedule.from_config(
        json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    )
    item, (empty_embeds, empty_pooled) = data[0], data.empty_text()
    batch = {k: item[k][None] for k in ("mean", "std", "prompt_embeds", "pooled", "time_ids")}
    batch["empty_embeds"], batch["empty_pooled"] = empty_embeds[None], empty_pooled[None]
    as_empty = {**batch, "prompt_embeds": empty_embeds[None], "pooled": empty_pooled[None]}
    shape = tuple(item["mean"].shape)
    keep = draw_step_noise(torch.Generator().manual_seed(1), 1, shape, _cfg("t", "d", "o"))
    drop = draw_step_noise(
        torch.Generator().manual_seed(1), 1, shape, _cfg("t", "d", "o", caption_dropout=0.999999)
    )
    cfg = _cfg("t", "d", "o")
    with torch.no_grad():
        dropped = per_sample_loss(unet, batch, drop, schedule, cfg, torch.float32)
        assert torch.equal(
            dropped, per_sample_loss(unet, as_empty, keep, schedule, cfg, torch.float32)
        )
        assert not torch.equal(
            dropped, per_sample_loss(unet, batch, keep, schedule, cfg, torch.float32)
        )
    assert item["time_ids"].tolist()[-2:] == [64.0, 64.0]  # target size = the 64 px bucket


def test_non_finite_loss_skips_the_step_and_names_the_sample(
    tiny_dir, cache_dir, tmp_path, caplog, monkeypatch
):
    from sdxl.data.cache import CachedDataset

    original = CachedDataset.__getitem__
    bad_key = original(CachedDataset(cache_dir / "latents", cache_dir / "text"), 0)["key"]

    def poisoned(self, i):
        item = original(self, i)
        if item["key"] == bad_key:
            item = {**item, "mean": torch.full_like(item["mean"], float("nan"))}
        return item

    monkeypatch.setattr(CachedDataset, "__getitem__", poisoned)
    out = tmp_path / "nan"
    train(_cfg(tiny_dir, cache_dir, out, num_epochs=1))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert sum(int(r["skipped"]) for r in rows) >= 1
    assert any(bad_key in r.message and "skipped" in r.message for r in caplog.records)
    state = torch.load(out / "checkpoint_final.pt", weights_only=True)["lora"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_ema_weights_are_exported(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "ema"
    train(_cfg(tiny_dir, cache_dir, out, use_ema=True, ema_decay=0.5, max_steps=4))
    live = torch.load(out / "checkpoint_final.pt", weights_only=True)
    shadow = live["ema"]["shadow"]
    assert shadow and all(s.dtype == torch.float32 for s in shadow)
    exported = _lora(out)
    ups = [k for k in exported if k.endswith("lora_up.weight")]
    live_ups = [v for k, v in live["lora"].items() if k.endswith("lora_up.weight")]
    assert any(
        not torch.allclose(exported[k].float(), v) for k, v in zip(ups, live_ups, strict=False)
    )


def test_strict_data_fails_with_one_clear_error(tiny_dir, small_dataset, tmp_path):
    from sdxl.data.dataset import DatasetError

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a broken image")
    with pytest.raises(DatasetError, match="broken.png"):
        train(_cfg(tiny_dir, data, tmp_path / "out", strict_data=True, max_steps=1))
    train(_cfg(tiny_dir, data, tmp_path / "skip", max_steps=1))  # default policy: skipped
    assert "broken.png" in (tmp_path / "skip" / "cache" / "problems.tsv").read_text()


def test_wandb_logging_in_offline_mode(tiny_dir, cache_dir, tmp_path, monkeypatch):
    """W&B gets the same metrics; a stand-in module records what the trainer sends."""
    import types

    logged, inits = [], []
    run = types.SimpleNamespace(
        log=lambda data, step: logged.append((step, data)), finish=lambda: None
    )
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run, Image=lambda p: p)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(_cfg(tiny_dir, cache_dir, tmp_path / "wb", wandb_project="sdxl-test", max_steps=2))
    assert inits[0]["project"] == "sdxl-test" and inits[0]["config"]["lora_rank"] == 4
    assert [s for s, _ in logged] == [1, 2] and "train/loss" in logged[0][1]


def test_resume_refuses_a_checkpoint_with_other_settings(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "changed"
    with pytest.raises(StopTraining):
        train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1), stop_after=1)
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 -> 0.002"):
        train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1, learning_rate=2e-3))
    train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1, num_epochs=1, resume_from="none"))
    assert (out / "lora_final.safetensors").is_file()
