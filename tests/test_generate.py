"""generate_images.py: identical output for any batch size or worker count, resume, COCO files.

The fault and bad-input cases of the reliability catalogue are in test_reliability_generate.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.generate.dataset import generate_dataset
from sdxl.generate.run import GenerateConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle", "a blue square", "a green star", "a yellow heart", "a pink ring")


def _cfg(tiny_dir, out, **kw) -> GenerateConfig:
    base = dict(pretrained_model=str(tiny_dir), output_dir=str(out), prompts=PROMPTS, width=64,
                height=64, num_inference_steps=2, guidance_scale=5.0, seed=3, device="cpu")  # fmt: skip
    return GenerateConfig(**{**base, **kw})


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset folder but the hidden lock, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def one_worker(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "w1b1"
    assert generate_dataset(_cfg(tiny_dir, out, save_metadata=True), num_workers=1) == len(PROMPTS)
    return out


def test_batch_size_and_workers_do_not_change_images(tiny_dir, tmp_path, one_worker, monkeypatch):
    # As on a 4-core machine: CPU workers that split the cores (two threads each, not this
    # process's one) round some pixels differently.
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    out = tmp_path / "w2b3"
    generate_dataset(_cfg(tiny_dir, out, batch_size=3), num_workers=2)
    want, got = _pixels(one_worker), _pixels(out)
    assert list(want) == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png"]
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name


def test_rerun_skips_finished_and_redoes_corrupt(tiny_dir, tmp_path, one_worker):
    out = tmp_path / "resume"
    cfg = _cfg(tiny_dir, out)
    assert generate_dataset(cfg, num_workers=1) == 5
    assert generate_dataset(cfg, num_workers=1) == 0  # nothing left to do
    (out / "00001.png").write_bytes((out / "00001.png").read_bytes()[:100])  # crash mid-write
    (out / "00003.png").unlink()
    mtime = (out / "00000.png").stat().st_mtime_ns
    assert generate_dataset(cfg, num_workers=1) == 2
    assert (out / "00000.png").stat().st_mtime_ns == mtime
    assert _pixels(out).keys() == _pixels(one_worker).keys()
    for name, pixels in _pixels(out).items():
        assert np.array_equal(pixels, _pixels(one_worker)[name])


def test_resume_check_reads_no_pixels(tiny_dir, one_worker, monkeypatch):
    """Deciding 'done' reads the PNG text chunks and tail only: a full decode would take hours."""
    from PIL import ImageFile

    from sdxl.generate.run import pending_indices

    def no_decode(self, *args, **kwargs):
        raise AssertionError("the resume check decoded an image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert pending_indices(_cfg(tiny_dir, one_worker, save_metadata=True), list(range(5))) == []


# A folder made with the one_worker settings, rerun with one thing changed: equals a fresh run.
CHANGES = {
    "prompts": dict(prompts=tuple(reversed(PROMPTS))),
    "seed": dict(seed=4),
    "size": dict(width=96, height=64),
    "sampler": dict(sampler="euler_a"),
    "steps": dict(num_inference_steps=3),
    "guidance": dict(guidance_scale=4.0),
    "negative": dict(negative_prompt="blurry"),
    "precision": dict(precision="fp32"),
    "fewer-images": dict(prompts=PROMPTS[:2]),
    "no-json": dict(save_metadata=False),
    "simple-format": dict(output_format="simple"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_rerun_with_other_settings_equals_a_fresh_folder(tiny_dir, tmp_path, one_worker, change):
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    shutil.copytree(one_worker, reused)
    kw = {"save_metadata": True, **CHANGES[change]}
    generate_dataset(_cfg(tiny_dir, reused, **kw), num_workers=1)
    generate_dataset(_cfg(tiny_dir, fresh, **kw), num_workers=1)
    assert _files(reused) == _files(fresh)


def test_same_model_path_with_other_weights_regenerates(tiny_dir, tmp_path):
    from sdxl.tiny import write_tiny_sdxl

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    generate_dataset(_cfg(model, tmp_path / "reused", prompts=PROMPTS[:2]), 1)
    write_tiny_sdxl(model, seed=1)  # same path, same sizes, other weights
    assert generate_dataset(_cfg(model, tmp_path / "reused", prompts=PROMPTS[:2]), 1) == 2
    generate_dataset(_cfg(model, tmp_path / "fresh", prompts=PROMPTS[:2]), 1)
    assert _files(tmp_path / "reused") == _files(tmp_path / "fresh")


def test_coco_files_agree_with_disk(one_worker):
    from pycocotools.coco import COCO

    coco = COCO(str(one_worker / "captions.json"))
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3, 4]
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert (one_worker / info["file_name"]).is_file()
        with Image.open(one_worker / info["file_name"]) as im:
            assert im.size == (info["width"], info["height"])
            assert im.text["parameters"].startswith(
                PROMPTS[image_id] + "\nSteps: 2, Sampler: Euler, Schedule type: Automatic"
            )
            assert json.loads(im.text["sdxl"])["seed"] == 3 + image_id
        caption = coco.loadAnns(coco.getAnnIds(imgIds=image_id))[0]["caption"]
        assert caption == PROMPTS[image_id] == (one_worker / f"{image_id:05d}.txt").read_text()
        assert json.loads((one_worker / f"{image_id:05d}.json").read_text())["prompt"] == caption
    lines = (one_worker / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert Image.open(one_worker / "contact_sheet.png").size[0] > 64


def test_contact_sheet_keeps_the_aspect_ratio(tiny_dir, tmp_path):
    out = tmp_path / "wide"
    generate_dataset(_cfg(tiny_dir, out, prompts=PROMPTS[:1], width=128, height=64), 1)
    cell = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))[:256, :256]
    with Image.open(out / "00000.png") as im:
        boxed = np.full((256, 256, 3), 255, np.uint8)  # the 2:1 image in rows 64..191
        boxed[64:192] = np.asarray(im.convert("RGB").resize((256, 128), Image.BICUBIC))
        squashed = np.asarray(im.convert("RGB").resize((256, 256), Image.BICUBIC))
    assert np.abs(cell.astype(int) - boxed).max() <= 2
    assert np.abs(cell.astype(int) - squashed).max() > 8


def test_simple_format_writes_only_images(tiny_dir, tmp_path):
    out = tmp_path / "simple"
    generate_dataset(_cfg(tiny_dir, out, prompts=PROMPTS[:2], output_format="simple"), 1)
    assert list(_files(out)) == ["00000.png", "00001.png"]


@pytest.fixture(scope="module")
def trained_lora(tiny_dir, tmp_path_factory) -> Path:
    """A LoRA from a short real training run on the bundled dataset (high LR so it matters)."""
    from sdxl.train.config import TrainConfig
    from sdxl.train.loop import train

    data = tmp_path_factory.mktemp("lora-data")
    for image in sorted((ROOT / "examples" / "shapes").glob("*.png"))[:4]:
        (data / image.name).write_bytes(image.read_bytes())
        (data / f"{image.stem}.txt").write_text(image.with_suffix(".txt").read_text())
    out = tmp_path_factory.mktemp("lora-run")
    train(TrainConfig(data_dir=str(data), pretrained_model=str(tiny_dir), output_dir=str(out),
                      image_size=64, batch_size=2, max_steps=3, learning_rate=5e-2, precision="fp32",
                      device="cpu", lora_rank=4, lora_alpha=4.0, lora_target_mode="attention_out",
                      gradient_checkpointing=False))  # fmt: skip
    return out / "lora_final.safetensors"


def test_lora_changes_images_and_matches_diffusers(tiny_dir, tmp_path, one_worker, trained_lora):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    generate_dataset(_cfg(tiny_dir, out, prompts=PROMPTS[:2], loras=((str(trained_lora), 0.8),)), 1)
    ours = _pixels(out)
    base = _pixels(one_worker)
    assert all(not np.array_equal(ours[name], base[name]) for name in ours)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(trained_lora.parent), weight_name=trained_lora.name)
    pipe.fuse_lora(lora_scale=0.8)
    for i, name in enumerate(sorted(ours)):
        want = pipe(PROMPTS[i], width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(3 + i)).images[0]  # fmt: skip
        diff = np.abs(np.asarray(want, np.int16) - ours[name].astype(np.int16)).max()
        assert diff <= 2, (name, diff)


def test_fused_qkv_with_a_merged_lora_gives_the_same_images(
    tiny_dir, tmp_path, trained_lora, monkeypatch
):
    """--fused-qkv: the LoRA merges into the fused weight; images as unfused (float order aside)."""
    from sdxl.models.unet import UNet2DConditionModel

    lora = ((str(trained_lora), 0.8),)
    plain, fused = (tmp_path / "plain", tmp_path / "fused")
    generate_dataset(_cfg(tiny_dir, plain, prompts=PROMPTS[:2], loras=lora), 1)
    fuse, fused_models = UNet2DConditionModel.fuse_qkv, []
    monkeypatch.setattr(UNet2DConditionModel, "fuse_qkv",
                        lambda self: fused_models.append(self) or fuse(self))  # fmt: skip
    generate_dataset(_cfg(tiny_dir, fused, prompts=PROMPTS[:2], loras=lora, fused_qkv=True), 1)
    assert len(fused_models) == 1
    a, b = _pixels(plain), _pixels(fused)
    assert a.keys() == b.keys()
    assert max(np.abs(a[k].astype(np.int16) - b[k].astype(np.int16)).max() for k in a) <= 1
    # Recorded in the images: the plain folder rerun fused regenerates, never mixes the kinds.
    assert generate_dataset(_cfg(tiny_dir, plain, prompts=PROMPTS[:2], loras=lora,
                                 fused_qkv=True), 1) == 2  # fmt: skip


def test_same_lora_path_with_other_weights_regenerates(tiny_dir, tmp_path, trained_lora):
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "lora.safetensors"
    shutil.copy(trained_lora, lora)
    kw = dict(prompts=PROMPTS[:2], loras=((str(lora), 1.0),))
    generate_dataset(_cfg(tiny_dir, tmp_path / "reused", **kw), 1)
    tensors = load_file(lora)
    save_file({k: -v if "lora_up" in k else v for k, v in tensors.items()}, str(lora))
    assert generate_dataset(_cfg(tiny_dir, tmp_path / "reused", **kw), 1) == 2
    generate_dataset(_cfg(tiny_dir, tmp_path / "fresh", **kw), 1)
    assert _files(tmp_path / "reused") == _files(tmp_path / "fresh")


# ----------------------------------------------------------------------------- background writer


def test_background_writes_equal_synchronous_writes(tiny_dir, tmp_path, one_worker, monkeypatch):
    """one_worker was written by the writer threads; writing in the generating thread gives the
    same bytes in every file."""
    monkeypatch.setattr("sdxl.generate.run.WRITE_THREADS", 0)
    out = tmp_path / "sync"
    generate_dataset(_cfg(tiny_dir, out, save_metadata=True), num_workers=1)
    assert _files(out) == _files(one_worker)


def test_a_failing_background_write_fails_the_command_in_one_line(tiny_dir, tmp_path, capsys):
    from sdxl.cli.generate import main

    out = tmp_path / "fail"
    out.mkdir()
    (out / "00001.png").mkdir()  # the second image cannot be written
    argv = ["--pretrained-model", str(tiny_dir), "--output-dir", str(out), "--prompt", "x",
            "--num-images", "3", "--image-size", "64", "--num-inference-steps", "1",
            "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "00001.png" in lines[0] and "Traceback" not in err, err
    assert not (out / "captions.json").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_background_writer_bounds_the_queue_and_waits_for_all():
    import threading
    import time

    from sdxl.generate.writers import BackgroundWriter

    lock, state = threading.Lock(), {"queued": 0, "most": 0, "done": 0}

    def slow_write(_item):
        time.sleep(0.01)
        with lock:
            state["queued"] -= 1
            state["done"] += 1

    with BackgroundWriter(threads=2, max_pending=3) as writer:
        for item in range(12):
            with lock:
                state["queued"] += 1
                state["most"] = max(state["most"], state["queued"])
            writer.submit(slow_write, item)
    assert state["done"] == 12  # leaving the block waited for every write
    assert state["most"] <= 4  # three in flight plus the one being submitted


def test_compile_flag_reaches_the_config(tiny_dir):
    from sdxl.cli.generate import build_parser, config_from_args

    base = ["--pretrained-model", str(tiny_dir), "--prompt", "x"]
    for extra, want in (([], None), (["--compile"], True), (["--no-compile"], False)):
        assert config_from_args(build_parser().parse_args(base + extra)).compile is want
