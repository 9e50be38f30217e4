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

from sdxl.errors import UserError
from sdxl.models.networks import MODEL_CLASSES
from sdxl.train.config import TrainConfig
from sdxl.train.loop import train
from tests.interrupt import killed_after_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Eleven captioned images of the bundled example set (odd: batches of 2 leave a tail)."""
    folder = tmp_path_factory.mktemp("data") / "shapes"
    folder.mkdir()
    images = sorted(p for p in (ROOT / "examples" / "shapes").iterdir() if p.suffix != ".txt")[:11]
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
                gradient_checkpointing=False, prediction_type="epsilon",
                timestep_max=1000)  # fmt: skip
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
        "step-0000000.png",  # the base model: with prompts, always
        "step-0000002.png",
        "step-0000004.png",
    ]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == 1e-3 for r in rows)
    lora = torch.load(out / "lora_final.pt", weights_only=True)
    assert lora
    _assert_metadata_is_true(out / "lora_final.safetensors")


def _assert_metadata_is_true(path: Path) -> None:
    """The header describes this run (64 px, 4 steps of batch 2 on 11 images), not defaults."""
    import hashlib

    meta = _metadata(path)
    want = {"modelspec.resolution": "64x64", "ss_resolution": "(64, 64)",
            "modelspec.prediction_type": "epsilon", "ss_v_parameterization": "False",
            "ss_steps": "4", "ss_max_train_steps": "4", "ss_epoch": "0", "ss_num_epochs": "2",
            "ss_num_train_images": "11", "ss_batch_size_per_device": "2",
            "ss_total_batch_size": "2", "ss_gradient_accumulation_steps": "1",
            "ss_learning_rate": "0.001", "ss_seed": "5", "ss_network_dim": "4",
            "ss_network_alpha": "4.0", "ss_network_module": "networks.lora",
            "ss_sd_model_name": "tiny-sdxl"}  # fmt: skip
    assert {k: meta.get(k) for k in want} == want
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(weight_decay=0.01")
    blob = path.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little") :]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8


def _eval_loss(tiny_dir, cache_dir, lora_file: Path | None) -> float:
    """Mean loss over the training set with fixed noise and timesteps (so runs compare exactly)."""
    from sdxl.data.cached_dataset import CachedDataset
    from sdxl.lora import apply_loras
    from sdxl.lora_formats import load_lora_file
    from sdxl.noise_schedule import NoiseSchedule
    from sdxl.train.loss import draw_step_noise, per_sample_loss
    from sdxl.weights import load_component

    unet = load_component(
        tiny_dir, "unet", model_cls=MODEL_CLASSES["unet"], dtype=torch.float32, device="cpu"
    )
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

    unet = load_component(
        tiny_dir, "unet", model_cls=MODEL_CLASSES["unet"], dtype=torch.bfloat16, device="cpu"
    )
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
        with killed_after_step(stop):
            train(_cfg(tiny_dir, cache_dir, resumed, **kw))
    assert (resumed / "checkpoints" / "checkpoint-step0000006.pt").is_file()
    train(_cfg(tiny_dir, cache_dir, resumed, **kw))
    want, got = _lora(straight), _lora(resumed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    steps = [int(r["step"]) for r in csv.DictReader((resumed / "metrics.csv").open())]
    assert steps == sorted(set(steps))  # rows past the resume point were dropped, not repeated


def _header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _snapshots(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("lora-step*.safetensors"))


def test_a_longer_run_continues_a_shorter_one_and_equals_a_straight_run(
    tiny_dir, cache_dir, tmp_path
):
    """Raising max_steps continues from the final checkpoint; lowering it reuses the checkpoint
    at that step. Either way the LoRA (tensors and header) and the snapshots equal a straight run."""
    kw = dict(save_every_n_steps=2, save_last_n=2, checkpoint_steps=1, caption_dropout=0.3)
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, cache_dir, straight, max_steps=7, **kw))
    assert _snapshots(straight) == [
        "lora-step00000004.safetensors",
        "lora-step00000006.safetensors",
    ]
    assert len(list((straight / "checkpoints").glob("*.pt"))) == 2  # save_last_n: checkpoints too
    assert _header(straight / "lora-step00000006.safetensors")["ss_steps"] == "6"

    grown = tmp_path / "grown"
    train(_cfg(tiny_dir, cache_dir, grown, max_steps=3, **kw))
    assert _snapshots(grown) == ["lora-step00000002.safetensors"]
    train(_cfg(tiny_dir, cache_dir, grown, max_steps=7, **kw))
    log_steps = [int(r["step"]) for r in csv.DictReader((grown / "metrics.csv").open())]
    assert log_steps == list(range(1, 8))
    assert _snapshots(grown) == _snapshots(straight)
    for name in ("lora_final.safetensors", *_snapshots(straight)):
        want, got = _lora_file(straight / name), _lora_file(grown / name)
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert _header(grown / "lora_final.safetensors") == _header(straight / "lora_final.safetensors")

    shrunk = tmp_path / "shrunk"
    shutil.copytree(straight, shrunk)
    short = tmp_path / "short"
    train(_cfg(tiny_dir, cache_dir, short, max_steps=6, **kw))
    train(_cfg(tiny_dir, cache_dir, shrunk, max_steps=6, **kw))
    assert _snapshots(shrunk) == _snapshots(short)
    want, got = _lora(short), _lora(shrunk)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not (shrunk / "checkpoints/checkpoint-step0000007.pt").exists()


def test_epoch_snapshots_fall_on_epoch_ends_and_continue(tiny_dir, cache_dir, tmp_path):
    """kohya's save_every_n_epochs: 11 images at batch 2 are 6 steps per epoch, so snapshots
    at 6 and 12; the first equals a one-epoch run, and a 1-epoch run grown to 2 matches."""
    from sdxl.train.snapshots import grid_files

    kw = dict(save_every_n_epochs=1, save_every_n_steps=4, max_steps=None)
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, cache_dir, straight, num_epochs=2, **kw))
    assert _snapshots(straight) == [f"lora-step0000000{k}.safetensors" for k in (4, 6, 8)] + [
        "lora-step00000012.safetensors"]  # fmt: skip
    one = tmp_path / "one"
    train(_cfg(tiny_dir, cache_dir, one, num_epochs=1, **kw))
    want, got = _lora(one), _lora_file(straight / "lora-step00000006.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    train(_cfg(tiny_dir, cache_dir, one, num_epochs=2, **kw))  # continues from epoch 1
    assert _snapshots(one) == _snapshots(straight)
    assert all(torch.equal(_lora(one)[k], _lora(straight)[k]) for k in want)
    # The workflow's grids of this run: step 0, every 8 steps, every 2nd epoch's end, the final.
    final = straight / "lora_final.safetensors"
    snaps = {int(p.stem[-8:]): p for p in straight.glob("lora-step*.safetensors")}
    assert sorted(grid_files(snaps, final, _header(final), 8, 2)) == [0, 8, 12]
    assert (
        grid_files(snaps, final, _header(final), 0, 1)[6]
        == straight / "lora-step00000006.safetensors"
    )


def test_a_decaying_schedule_of_another_length_starts_over(tiny_dir, cache_dir, tmp_path, caplog):
    """cosine decays to zero at the last step: a 6-step run is not a 3-step run continued."""
    kw = dict(lr_scheduler="cosine", checkpoint_steps=1)
    out = tmp_path / "cosine"
    train(_cfg(tiny_dir, cache_dir, out, max_steps=3, **kw))
    with caplog.at_level("WARNING"):
        train(_cfg(tiny_dir, cache_dir, out, max_steps=6, **kw))
    assert "planned for 3 steps, this run has 6" in caplog.text and "starting over" in caplog.text
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, cache_dir, straight, max_steps=6, **kw))
    want, got = _lora(straight), _lora(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(UserError, match="schedule was planned for 6 steps"):
        train(_cfg(tiny_dir, cache_dir, out, max_steps=4,
                   resume_from=str(out / "checkpoint_final.pt"), **kw))  # fmt: skip


def _lora_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ddp_two_processes_equal_one(tiny_dir, cache_dir, tmp_path):
    """--batch_size is per GPU: 2 processes at batch 1 equal 1 process at batch 2.

    11 samples in one bucket: the last global batch holds 1 sample, so rank 1 has nothing in
    that step and must still join the gradient sum (with zeros).
    """
    args = ["--data_dir", str(cache_dir), "--pretrained_model", str(tiny_dir), "--image_size", "64",
            "--num_epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3", "--seed", "5",
            "--no-gradient_checkpointing", "--log_interval", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "ddp"
    script = str(ROOT / "train_sdxl.py")
    subprocess.run([sys.executable, script, *args, "--batch_size", "2", "--output_dir", str(single)],
                   check=True, env=env)  # fmt: skip
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29611", script, *args, "--batch_size", "1",
                    "--output_dir", str(double)], check=True, env=env)  # fmt: skip
    want, got = _lora(single), _lora(double)
    assert want.keys() == got.keys()
    for k in want:  # equal up to the order of float sums, which Adam amplifies for tiny grads
        rel = (got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-12)
        assert rel < 1e-3, (k, rel)
    # Adam hides a wrong gradient scale; the logged global loss and gradient norm do not.
    rows = [list(csv.DictReader((out / "metrics.csv").open())) for out in (single, double)]
    assert len(rows[0]) == len(rows[1]) == 6  # ceil(11 / 2): no sample dropped
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4 * abs(float(a[key])), (key, a, b)
    metas = [_metadata(out / "lora_final.safetensors") for out in (single, double)]
    assert metas[0]["ss_total_batch_size"] == metas[1]["ss_total_batch_size"] == "2"
    assert (metas[0]["ss_batch_size_per_device"], metas[1]["ss_batch_size_per_device"]) == (
        "2",
        "1",
    )


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_batches_never_drop_samples():
    from sdxl.train.data_order import epoch_batches, rank_rows

    buckets = {(64, 64): list(range(7)), (64, 128): [7, 8, 9]}
    batches = epoch_batches(buckets, epoch=0, seed=1, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert sorted(len(b) for b in batches) == [3, 3, 4]  # short tails are kept
    short = [0]  # a tail of 1 sample at 4 ranks x batch 1: rank 0 has it, 1-3 only padding
    assert [short[rank_rows(r, 1)] for r in range(4)] == [[0], [], [], []]


def test_images_per_s_counts_the_global_batch_once(tiny_dir, cache_dir, tmp_path, monkeypatch):
    """Under DDP a step's batch is already global; it was multiplied by the world size again."""
    import types

    from sdxl.train import distributed, loop

    clock = iter(range(10_000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(
        distributed, "setup", lambda device: distributed.DistInfo(0, 2, torch.device("cpu"))
    )
    out = tmp_path / "rate"
    train(_cfg(tiny_dir, cache_dir, out, batch_size=1, max_steps=2))
    from sdxl.data.cached_dataset import CachedDataset
    from sdxl.train.data_order import epoch_batches

    data = CachedDataset(cache_dir / "latents", cache_dir / "text")
    buckets = {b: [i for i in idx if not data.is_flipped(i)] for b, idx in data.buckets().items()}
    want = [float(len(b)) for b in epoch_batches(buckets, 0, 5, 2)[:2]]  # global batches of 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [float(r["images_per_s"]) for r in rows] == want  # each step took 1 fake second


def test_prediction_type_and_timesteps_come_from_the_model(tiny_dir, cache_dir, tmp_path):
    """Defaults are the model's (here a v-prediction schedule); a contradiction is refused."""
    model = tmp_path / "vpred"
    model.mkdir()
    for part in tiny_dir.iterdir():
        if part.name != "scheduler":
            (model / part.name).symlink_to(part)
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**sched, "prediction_type": "v_prediction", "num_train_timesteps": 500})
    )
    with pytest.raises(UserError, match="--prediction_type epsilon but .*scheduler_config.json"):
        train(_cfg(model, cache_dir, tmp_path / "refused"))
    with pytest.raises(UserError, match="--timestep_max 1000 is past the 500 timesteps"):
        train(_cfg(model, cache_dir, tmp_path / "refused", prediction_type=None))
    out = tmp_path / "v"
    train(_cfg(model, cache_dir, out, prediction_type=None, timestep_max=None, max_steps=1))
    config = json.loads((out / "config.json").read_text())
    assert (config["prediction_type"], config["timestep_max"]) == ("v_prediction", 500)
    meta = _metadata(out / "lora_final.safetensors")
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_v_parameterization"] == "True"
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_torchrun_dies_with_its_parent_which_holds_the_lock(tmp_path, monkeypatch):
    """run_training holds output_dir's lock while torchrun runs; torchrun gets PDEATHSIG."""
    from sdxl.procs import FolderBusy, folder_lock
    from sdxl.train import launch

    seen = {}

    def fake_run(command, check, env, preexec_fn):
        seen.update(command=command, env=env, preexec_fn=preexec_fn)
        with pytest.raises(FolderBusy), folder_lock(tmp_path / "out"):  # a second writer
            pass

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    calls = []
    monkeypatch.setattr(launch, "die_with_parent", lambda pid: calls.append(pid))
    launch.run_training(_cfg("t", "d", tmp_path / "out"), num_gpus=2)
    seen["preexec_fn"]()
    assert calls == [os.getpid()]
    assert seen["env"][launch.LOCK_HELD_ENV] == str((tmp_path / "out").resolve())
    with folder_lock(tmp_path / "out"):  # released when torchrun is done
        pass


def test_fused_qkv_and_selective_checkpointing_learn_the_same_lora(
    tiny_dir, cache_dir, tmp_path, monkeypatch
):
    """Speed options only: fused q/k/v GEMMs and selective recompute train the same LoRA."""
    from sdxl.models.unet import UNet2DConditionModel

    plain, fast = tmp_path / "plain", tmp_path / "fast"
    train(_cfg(tiny_dir, cache_dir, plain, max_steps=2))
    used = []
    for name in ("fuse_qkv", "set_gradient_checkpointing"):
        method = getattr(UNet2DConditionModel, name)
        monkeypatch.setattr(UNet2DConditionModel, name,
                            lambda self, *a, _m=method, _n=name: used.append((_n, *a)) or _m(self, *a))  # fmt: skip
    train(_cfg(tiny_dir, cache_dir, fast, max_steps=2, fused_qkv=True,
               gradient_checkpointing=True, checkpointing_mode="selective"))  # fmt: skip
    assert used == [("fuse_qkv",), ("set_gradient_checkpointing", "selective")]
    want, got = _lora(plain), _lora(fast)
    assert want.keys() == got.keys()
    for k in want:  # equal up to float order, which Adam amplifies where a gradient is ~0
        rel = (got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp(min=1e-12)
        assert rel < 1e-3, (k, rel)


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


@pytest.mark.parametrize(
    ("kind", "extra", "reference"),
    [
        ("linear", {}, "get_linear_schedule_with_warmup"),
        ("cosine", {}, "get_cosine_schedule_with_warmup"),
        ("cosine_with_restarts", {"lr_scheduler_num_cycles": 3},
         "get_cosine_with_hard_restarts_schedule_with_warmup"),
        ("polynomial", {"lr_scheduler_power": 2.0}, "get_polynomial_decay_schedule_with_warmup"),
    ],
)  # fmt: skip
def test_lr_schedules_have_diffusers_shapes(kind, extra, reference):
    """Step s of ours takes the rate diffusers' schedule gives at s (we start warmup at step 1)."""
    import diffusers.optimization as reference_schedules

    from sdxl.train.optim import lr_at

    cfg = _cfg("t", "d", "o", lr_scheduler=kind, warmup_steps=3, learning_rate=2e-3, **extra)
    kwargs = {"num_cycles": 3} if "restarts" in reference else {}
    kwargs |= {"power": 2.0, "lr_end": 0.0} if kind == "polynomial" else {}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule = getattr(reference_schedules, reference)(optimizer, 3, 20, **kwargs)
    want = [2e-3 * schedule.lr_lambdas[0](s) for s in range(1, 21)]
    assert [lr_at(s, cfg, 20) for s in range(1, 21)] == pytest.approx(want, abs=1e-12)
    if kind == "cosine_with_restarts":  # after warmup it jumps back up twice: three cycles
        decay = want[3:]
        assert sum(b > a for a, b in zip(decay, decay[1:], strict=False)) == 2


@pytest.mark.parametrize(
    ("optimizer", "lr"),
    [("adamw", 1e-3), ("adamw8bit", 1e-3), ("prodigy", 1.0), ("adafactor", 1e-3), ("lion", 1e-4)],
)
def test_each_optimizer_trains_and_resumes(tiny_dir, cache_dir, tmp_path, optimizer, lr):
    """Each optimizer moves the LoRA (up matrices start at zero), and its state resumes exactly."""
    kw = dict(optimizer=optimizer, learning_rate=lr, max_steps=3, checkpoint_steps=1)
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, cache_dir, straight, **kw))
    lora = _lora(straight)
    ups = [v for k, v in lora.items() if "lora_up" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)
    resumed = tmp_path / "resumed"
    with killed_after_step(2):
        train(_cfg(tiny_dir, cache_dir, resumed, **kw))
    train(_cfg(tiny_dir, cache_dir, resumed, **kw))
    assert all(torch.equal(lora[k], _lora(resumed)[k]) for k in lora)
    meta = _header(straight / "lora_final.safetensors")["ss_optimizer"]
    names = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy",
             "adafactor": "Adafactor", "lion": "Lion"}  # fmt: skip
    assert names[optimizer] in meta


def test_optimizer_args_reach_the_optimizer(tiny_dir, cache_dir, tmp_path):
    from sdxl.train.config import TrainConfig
    from sdxl.train.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = TrainConfig(data_dir="d", optimizer="prodigy", learning_rate=1.0,
                      optimizer_args=("d_coef=2.0", "safeguard_warmup=True"))  # fmt: skip
    group = make_optimizer(params, cfg).param_groups[0]
    assert group["d_coef"] == 2.0 and group["safeguard_warmup"] is True
    with pytest.raises(UserError, match="--optimizer lion: .*no_such_arg"):
        make_optimizer(params, TrainConfig(data_dir="d", optimizer="lion",
                                           optimizer_args=("no_such_arg=1",)))  # fmt: skip
    adamw = TrainConfig(data_dir="d", optimizer_args=("fused=False", "amsgrad=True"))
    group = make_optimizer(params, adamw).param_groups[0]  # the user's values win
    assert group["fused"] is False and group["amsgrad"] is True
    with pytest.raises(UserError, match="write key=value"):
        make_optimizer(params, TrainConfig(data_dir="d", optimizer_args=("d_coef",)))


def test_a_missing_optimizer_package_is_one_clear_error(monkeypatch):
    import sys

    from sdxl.train.config import TrainConfig
    from sdxl.train.optim import make_optimizer

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(UserError, match="needs prodigyopt: install it with `uv sync --extra"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))],
                       TrainConfig(data_dir="d", optimizer="prodigy"))  # fmt: skip


def test_tensorboard_gets_the_metrics_and_grids_without_repeats_after_a_resume(
    tiny_dir, cache_dir, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    kw = dict(report_to="tensorboard", max_steps=4, checkpoint_steps=2, validation_interval=2,
              validation_prompts=("a red circle",), num_validation_images=1, validation_steps=1)  # fmt: skip
    with killed_after_step(3):
        train(_cfg(tiny_dir, cache_dir, out, **kw))
    train(_cfg(tiny_dir, cache_dir, out, **kw))  # resumes at step 2: step 3 is logged again
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # step 3 once: the resumed run's
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows])
    assert {"train/lr", "train/grad_norm", "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("validation/grid")] == [0, 2, 4]  # 0: the base


def test_a_single_file_model_trains_like_its_diffusers_folder(
    tiny_dir, small_dataset, tmp_path, monkeypatch
):
    """--pretrained_model may be a single .safetensors: converted once (cached), then the same
    LoRA as from the folder."""
    from sdxl.weights import COMPONENTS, load_component_state_dict, save_single_file

    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    single = save_single_file({n: load_component_state_dict(tiny_dir / n) for n in COMPONENTS},
                              tmp_path / "tiny.safetensors")  # fmt: skip
    kw = dict(max_steps=2, config_source=str(tiny_dir))
    train(_cfg(tiny_dir, small_dataset, tmp_path / "folder", **kw))
    train(_cfg(single, small_dataset, tmp_path / "file", **kw))
    want, got = _lora(tmp_path / "folder"), _lora(tmp_path / "file")
    assert all(torch.equal(want[k], got[k]) for k in want)
    (converted,) = (tmp_path / "cache/models").glob("tiny-*")
    mtime = (converted / "manifest.json").stat().st_mtime_ns
    train(_cfg(single, small_dataset, tmp_path / "again", **kw))
    assert (converted / "manifest.json").stat().st_mtime_ns == mtime  # converted once


def test_a_hub_repo_id_is_downloaded_once_for_training(fake_hub, tmp_path, monkeypatch):
    from sdxl.train.caches import resolve_model_dir

    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    model = resolve_model_dir("someone/sdxl-finetune")
    assert model == tmp_path / "cache/models/someone--sdxl-finetune"
    assert (model / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert resolve_model_dir("someone/sdxl-finetune") == model
    assert fake_hub.calls == ["someone/sdxl-finetune"]  # downloaded once
    with pytest.raises(UserError, match="--pretrained_model: .*no such model folder"):
        resolve_model_dir("./no/such/folder")


def test_caption_dropout_trains_on_the_empty_caption(tiny_dir, cache_dir):
    from sdxl.data.cached_dataset import CachedDataset
    from sdxl.noise_schedule import NoiseSchedule
    from sdxl.train.loss import draw_step_noise, per_sample_loss
    from sdxl.weights import load_component

    unet = load_component(
        tiny_dir, "unet", model_cls=MODEL_CLASSES["unet"], dtype=torch.float32, device="cpu"
    )
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
    from sdxl.data.cached_dataset import CachedDataset

    original = CachedDataset.__getitem__
    first = original(CachedDataset(cache_dir / "latents", cache_dir / "text"), 0)
    bad_key, bad_item = first["key"], first["item"]

    def poisoned(self, i):  # both the plain and the mirrored variant, whichever the draw picks
        item = original(self, i)
        if item["item"] == bad_item:
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
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a broken image")
    with pytest.raises(UserError, match="drop --strict_data") as err:
        train(_cfg(tiny_dir, data, tmp_path / "out", strict_data=True, max_steps=1))
    assert "broken.png" in str(err.value) and "policy 'skip'" not in str(err.value)
    train(_cfg(tiny_dir, data, tmp_path / "skip", max_steps=1))  # default policy: skipped
    assert "broken.png" in (tmp_path / "skip" / "cache" / "problems.tsv").read_text()


def test_wandb_logging_in_offline_mode(tiny_dir, cache_dir, tmp_path, monkeypatch):
    """W&B gets the same metrics, and a resumed run continues the same W&B run (saved id)."""
    import types

    logged, inits = [], []

    def init(**kw):
        inits.append(kw)
        return types.SimpleNamespace(id=kw["id"] or f"run{len(inits)}", finish=lambda: None,
                                     log=lambda data, step: logged.append((step, data)))  # fmt: skip

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=str))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(tiny_dir, cache_dir, tmp_path / "wb", wandb_project="sdxl-test", max_steps=2,
               checkpoint_steps=1)  # fmt: skip
    with killed_after_step(1):
        train(cfg)
    train(cfg)
    assert inits[0]["project"] == "sdxl-test" and inits[0]["config"]["lora_rank"] == 4
    assert inits[0]["id"] is None and inits[1]["id"] == "run1" and inits[1]["resume"] == "allow"
    assert [s for s, _ in logged] == [1, 2] and "train/loss" in logged[0][1]


def test_resume_refuses_a_checkpoint_with_other_settings(tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "changed"
    with killed_after_step(1):
        train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1))
    with pytest.raises(UserError, match=r"learning_rate: 0.001 -> 0.002"):
        train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1, learning_rate=2e-3))
    train(_cfg(tiny_dir, cache_dir, out, checkpoint_steps=1, num_epochs=1, resume_from="none"))
    assert (out / "lora_final.safetensors").is_file()
