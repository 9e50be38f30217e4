"""LoRA training on the tiny model: it learns, bf16 updates survive, resume and DDP are exact."""

from __future__ import annotations

import csv
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
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == 1e-3 for r in rows)
    lora = torch.load(out / "lora_final.pt", weights_only=True)
    assert lora


def test_loss_goes_down(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "learn"
    train(_cfg(tiny_dir, cache_dir, out, num_epochs=12, learning_rate=3e-3, lora_rank=8,
               lora_target_mode="all"))  # fmt: skip
    losses = [float(r["loss"]) for r in csv.DictReader((out / "metrics.csv").open())]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.9 * first, (first, last)


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
            "--no-gradient_checkpointing"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "ddp"
    script = str(ROOT / "train_sdxl.py")
    subprocess.run([sys.executable, script, *args, "--output_dir", str(single)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29611", script, *args, "--output_dir", str(double)],
                   check=True, env=env)  # fmt: skip
    want, got = _lora(single), _lora(double)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
