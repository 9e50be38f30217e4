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
            assert im.text["parameters"].startswith(PROMPTS[image_id] + "\nSteps: 2, Sampler: euler")
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
