"""Sample prompts in kohya's format: the parser, the grids they give during training (step 0,
every N epochs, the end; each prompt at its own size and seed, in TensorBoard too) and the
workflow's validate_run drawing the base model as step 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl.errors import UserError
from sdxl.images import make_grid
from sdxl.train.config import TrainConfig
from sdxl.train.sample_prompts import SamplePrompt, read_prompt_lines, sample_prompts

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "# kohya's format\n\na red circle --w 64 --h 128 --d 7 --s 2\na blue square\n"
GUIDANCE = 3.0


# ------------------------------------------------------------------------------ the parser


def test_every_option_is_read_and_the_rest_are_the_runs_defaults():
    lines = ["a cat, sitting --n blurry, ugly --w 512 --h 768 --d 42 --s 12 --l 3.5", "a dog",
             "a bird --L 2 --D 9"]  # fmt: skip
    got = sample_prompts(lines, size=1024, seed=5, steps=20, guidance=7.5)
    assert got == [
        SamplePrompt("a cat, sitting", "blurry, ugly", 512, 768, 42, 12, 3.5),
        SamplePrompt("a dog", "", 1024, 1024, 6, 20, 7.5),  # seed + its index, as before
        SamplePrompt("a bird", "", 1024, 1024, 9, 20, 2.0),  # option letters in any case
    ]


def test_a_prompt_file_skips_comments_and_empty_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff# a comment\n\n  a cat --w 64  \n   # indented comment\na dog\n")
    assert read_prompt_lines(path, "--sample_prompts") == ["a cat --w 64", "a dog"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --ss euler_a", ":3: unknown option --ss; a sample prompt takes --n"),
        ("a cat --w 100", ":3: width 100 must be a positive multiple of 8"),
        ("a cat --h 0", ":3: height 0 must be a positive multiple of 8"),
        ("a cat --d seven", ":3: --d needs an integer, got 'seven'"),
        ("a cat --s 0", ":3: --s 0: sampling steps must be at least 1"),
        (" --w 64", ":3: the line has options but no prompt"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\na fine prompt\n{line}\n")
    with pytest.raises(UserError, match=f"^{path}{message}"):
        read_prompt_lines(path, "--sample_prompts")


def test_missing_and_empty_files_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--sample_prompts .*nope.txt: no such file"):
        read_prompt_lines(tmp_path / "nope.txt", "--sample_prompts")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="empty.txt: no prompts in the file"):
        read_prompt_lines(tmp_path / "empty.txt", "--sample_prompts")


def test_train_config_checks_its_prompt_lines_and_the_kohya_interval_alias():
    with pytest.raises(UserError, match=r"validation_prompts\[1\]: unknown option --cfgr"):
        TrainConfig(data_dir="d", validation_prompts=("fine", "a cat --cfgr 0.5"))
    with pytest.raises(ValueError, match="sample_every_n_steps 4 is kohya's name for"):
        TrainConfig(data_dir="d", sample_every_n_steps=4, validation_interval=2)
    cfg = TrainConfig(data_dir="d", sample_every_n_steps=4, image_size=128, seed=3,
                      validation_prompts=("a", "b --h 64", "c"), num_validation_images=2)  # fmt: skip
    assert cfg.sample_interval == 4
    assert [(s.prompt, s.width, s.height, s.seed) for s in cfg.samples] == [
        ("a", 128, 128, 3),
        ("b", 128, 64, 4),
    ]


def test_a_grid_of_mixed_sizes_keeps_each_image_as_drawn():
    tall, square = Image.new("RGB", (64, 128), "red"), Image.new("RGB", (32, 32), "blue")
    grid = make_grid([tall, square], ["tall", "square"])
    assert grid.size == (128, 128 + 24)  # cells of the largest width and height, 2 caption lines
    assert np.array_equal(np.asarray(grid.crop((0, 0, 64, 128))), np.asarray(tall))
    assert np.array_equal(np.asarray(grid.crop((80, 0, 112, 32))), np.asarray(square))  # centred
    assert grid.getpixel((64 + 8, 64)) == (255, 255, 255)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "shapes"
    folder.mkdir()
    for image in sorted(p for p in (ROOT / "examples" / "shapes").iterdir() if p.suffix == ".png")[
        :2
    ]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


def _cli_args(tiny_dir, data, out, prompts) -> list[str]:
    """3 epochs of one step (2 images, batch 2), a grid every 2nd epoch: steps 0, 2 and 3."""
    return ["--data_dir", str(data), "--pretrained_model", str(tiny_dir), "--output_dir", str(out),
            "--image_size", "64", "--precision", "fp32", "--device", "cpu", "--lora_rank", "2",
            "--no-gradient_checkpointing", "--batch_size", "2", "--num_epochs", "3",
            "--learning_rate", "1e-2", "--seed", "3", "--report_to", "tensorboard",
            "--sample_prompts", str(prompts), "--sample_every_n_epochs", "2",
            "--validation_steps", "2", "--validation_guidance_scale", str(GUIDANCE)]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(tiny_dir, two_images, tmp_path_factory) -> Path:
    from sdxl.cli.train import main

    work = tmp_path_factory.mktemp("samples")
    (work / "prompts.txt").write_text(SAMPLES)
    out = work / "out"
    assert main(_cli_args(tiny_dir, two_images, out, work / "prompts.txt")) == 0
    return out


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from sdxl.pipeline import load_pipeline

    return load_pipeline(tiny_dir, device="cpu", dtype="fp32")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_training_draws_step_0_every_n_epochs_and_the_end(cli_run):
    grids = sorted(p.name for p in (cli_run / "samples").iterdir())
    assert grids == ["step-0000000.png", "step-0000002.png", "step-0000003.png"]
    config = json.loads((cli_run / "config.json").read_text())
    assert config["validation_prompts"] == ["a red circle --w 64 --h 128 --d 7 --s 2",
                                            "a blue square"]  # fmt: skip
    assert config["sample_prompts"].endswith("prompts.txt")


def test_each_prompt_is_drawn_at_its_own_size_and_seed(cli_run, pipe):
    """Step 0 is the base model: its cells are what generation draws with the line's options."""
    with Image.open(cli_run / "samples" / "step-0000000.png") as grid:
        assert grid.size == (128, 128 + 24)  # two cells of 64x128 (the tallest) and captions
        first, second = grid.crop((0, 0, 64, 128)), grid.crop((64, 0, 128, 64))
    from sdxl.pipeline import SampleSettings

    draw = lambda prompt, **kw: _pixels(  # noqa: E731
        pipe.generate(prompt, SampleSettings(guidance_scale=GUIDANCE, **kw))[0]
    )
    want = draw("a red circle", width=64, height=128, num_inference_steps=2, seed=7)
    assert np.abs(_pixels(first) - want).max() <= 1  # the same image, up to the last bit
    other_seed = draw("a red circle", width=64, height=128, num_inference_steps=2, seed=8)
    assert np.abs(_pixels(first) - other_seed).mean() > 5
    want = draw("a blue square", width=64, height=64, num_inference_steps=2, seed=3 + 1)
    assert np.abs(_pixels(second) - want).max() <= 1  # defaults: image_size, seed + index


def test_tensorboard_holds_every_grid(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli_run / "logs"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("validation/grid")
    assert [e.step for e in images] == [0, 2, 3]
    assert (images[0].width, images[0].height) == (128, 152)


def test_a_finished_run_run_again_draws_no_grid(cli_run, tiny_dir, two_images):
    from sdxl.cli.train import main

    before = {p.name: p.stat().st_mtime_ns for p in (cli_run / "samples").iterdir()}
    assert main(_cli_args(tiny_dir, two_images, cli_run, cli_run.parent / "prompts.txt")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (cli_run / "samples").iterdir()} == before


def test_a_negative_prompt_is_encoded_and_an_empty_one_is_zeros(tiny_dir, pipe):
    from sdxl.pipeline import SampleSettings
    from sdxl.train.validation import Validator

    samples = [SamplePrompt("a cat", neg, 64, 64, 1, 2, GUIDANCE) for neg in ("", "blurry")]
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    validator = Validator(tiny_dir, samples, sched)
    assert not validator.text.neg_embeds[0].any() and validator.text.neg_embeds[1].any()
    got = [_pixels(validator.image(validator.pipeline(pipe.unet), k)) for k in range(2)]
    for image, neg in zip(got, ("", "blurry"), strict=True):
        settings = SampleSettings(negative_prompt=neg, width=64, height=64, num_inference_steps=2,
                                  guidance_scale=GUIDANCE, seed=1)  # fmt: skip
        want = pipe.generate("a cat", settings)[0]
        assert np.abs(image - _pixels(want)).max() <= 1


def test_validate_run_draws_the_base_model_as_step_0(cli_run, tiny_dir, tmp_path):
    from sdxl.train.validation import validate_run

    cfg = TrainConfig.from_dict({**json.loads((cli_run / "config.json").read_text())})
    files = {0: None, 3: cli_run / "lora_final.safetensors"}
    index = validate_run(files, tiny_dir, cfg.samples, tmp_path)
    assert [(g["step"], g["lora"]) for g in index["grids"]] == [
        (0, None),
        (3, "lora_final.safetensors"),
    ]
    assert index["prompts"] == ["a red circle", "a blue square"] and index["size"] == 64
    base, final = (_pixels(Image.open(tmp_path / f"step-{s:07d}.png")) for s in (0, 3))
    assert np.abs(base - _pixels(Image.open(cli_run / "samples/step-0000000.png"))).max() <= 1
    assert np.abs(final - _pixels(Image.open(cli_run / "samples/step-0000003.png"))).max() <= 1
    assert np.abs(base - final).mean() > 0  # the LoRA changed the samples
    mtimes = [(tmp_path / g["file"]).stat().st_mtime_ns for g in index["grids"]]
    validate_run(files, tiny_dir, cfg.samples, tmp_path)  # nothing changed: both kept
    assert [(tmp_path / g["file"]).stat().st_mtime_ns for g in index["grids"]] == mtimes
