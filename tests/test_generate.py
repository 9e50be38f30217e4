"""generate_images.py: identical output for any batch size or worker count, resume, COCO files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl.generate.run import GenerateConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle", "a blue square", "a green star", "a yellow heart", "a pink ring")


def _cfg(tiny_dir, out, **kw) -> GenerateConfig:
    base = dict(pretrained_model=str(tiny_dir), output_dir=str(out), prompts=PROMPTS, width=64,
                height=64, num_inference_steps=2, guidance_scale=5.0, seed=3, device="cpu")  # fmt: skip
    return GenerateConfig(**{**base, **kw})


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.fixture(scope="module")
def one_worker(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "w1b1"
    assert generate_dataset(_cfg(tiny_dir, out, save_metadata=True), num_workers=1) == len(PROMPTS)
    return out


def test_batch_size_and_workers_do_not_change_images(tiny_dir, tmp_path, one_worker):
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
                PROMPTS[image_id] + "\nSteps: 2, Sampler: euler"
            )
            assert json.loads(im.text["sdxl"])["seed"] == 3 + image_id
        caption = coco.loadAnns(coco.getAnnIds(imgIds=image_id))[0]["caption"]
        assert caption == PROMPTS[image_id] == (one_worker / f"{image_id:05d}.txt").read_text()
        assert json.loads((one_worker / f"{image_id:05d}.json").read_text())["prompt"] == caption
    lines = (one_worker / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert Image.open(one_worker / "contact_sheet.png").size[0] > 64


def test_simple_format_writes_only_images(tiny_dir, tmp_path):
    out = tmp_path / "simple"
    generate_dataset(_cfg(tiny_dir, out, prompts=PROMPTS[:2], output_format="simple"), 1)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate_images.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-file", "missing.txt"], "prompt file not found"),
        (["--prompt", "x", "--image-size", "100"], "multiple of 8"),
        (["--prompt", "x", "--image-size", "axb"], "N or WxH"),
        (["--prompt", "x", "--scheduler", "plms"], "invalid choice"),
        (["--prompt", "x", "--device", "cuda"], "no CUDA GPU"),
        (["--prompt", "x", "--lora-checkpoint", "nope.safetensors"], "file not found"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_dir, tmp_path, args, message):
    result = _cli("--pretrained-model", str(tiny_dir), "--output-dir", str(tmp_path), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_prompt_file_is_a_clear_error(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n")
    result = _cli("--pretrained-model", str(tiny_dir), "--prompt-file", str(prompts))
    assert result.returncode != 0 and "has no prompts" in result.stderr


def test_cli_cycles_prompt_file(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    result = _cli("--pretrained-model", str(tiny_dir), "--prompt-file", str(prompts),
                  "--num-images", "3", "--image-size", "64", "--num-inference-steps", "1",
                  "--output-dir", str(out), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [(out / f"0000{i}.txt").read_text() for i in range(3)] == [
        "a red circle", "a blue square", "a red circle"]  # fmt: skip


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
    import torch
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


def test_a_failing_worker_fails_the_command(tiny_dir, tmp_path):
    out = tmp_path / "fail"
    out.mkdir()
    (out / "00001.png").mkdir()  # worker 1 (odd indices) cannot write its first image
    with pytest.raises(RuntimeError, match=r"worker 1 \(cpu\) failed") as err:
        generate_dataset(_cfg(tiny_dir, out, prompts=PROMPTS[:4]), num_workers=2)
    assert "00001.png" in str(err.value)
    assert not (out / "captions.json").exists()


def test_lora_for_another_architecture_is_a_clear_error(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320)},
              str(lora), metadata={"ss_base_model_version": "sd_v1"})  # fmt: skip
    result = _cli("--pretrained-model", str(tiny_dir), "--prompt", "x", "--image-size", "64",
                  "--lora-checkpoint", str(lora), "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode != 0
    assert "not a usable SDXL UNet LoRA" in result.stderr and "sd_v1" in result.stderr
    assert "Traceback" not in result.stderr
