"""The reliability catalogue (../shared/notes/reliability.md) as seen by train_sdxl.py.

Data, Weights and Training-faults rows, each through the CLI: an expected failure is exactly
one `error: ...` line (no traceback) and leaves what was made intact; a bad item is skipped
and listed. The kill -9 cases stop a real trainer process at an exact point (the test-only
pause hook in sdxl.train.hooks), kill it and rerun: the LoRA equals the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl.cli.train import main
from sdxl.errors import UserError
from sdxl.procs import child_pids, is_alive
from sdxl.train.hooks import PAUSE_AT, PAUSE_FILE

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--image_size", "64", "--precision", "fp32", "--device", "cpu", "--lora_rank", "2",
          "--lora_alpha", "2", "--no-gradient_checkpointing", "--log_interval", "1", "--seed", "3",
          "--batch_size", "2", "--learning_rate", "1e-3"]  # fmt: skip
# The run the kill and resume cases must reproduce: 6 images, 3 steps per epoch, 4 steps.
RUN = ["--num_epochs", "2", "--max_steps", "4", "--checkpoint_steps", "1"]


def _args(tiny_dir, data, out, *extra) -> list[str]:
    return ["--data_dir", str(data), "--pretrained_model", str(tiny_dir),
            "--output_dir", str(out), *COMMON, *extra]  # fmt: skip


def _cli(capsys, args) -> tuple[int, str]:
    """Run train_sdxl.py in this process: (exit code, stderr)."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *words: str) -> str:
    """The single `error:` line, checked: non-zero exit, no traceback, names `words`."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora_final.safetensors"))


def _assert_same_lora(a: Path, b: Path) -> None:
    want, got = _lora(a), _lora(b)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    """The cases check what the trainer logs at INFO (resuming from, skipping, removed)."""
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Six captioned images of the bundled example set."""
    folder = tmp_path_factory.mktemp("shapes") / "data"
    folder.mkdir()
    for image in sorted(p for p in (ROOT / "examples" / "shapes").glob("*.[pj][np]g"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_dir, shapes, tmp_path_factory) -> Path:
    """The uninterrupted run every kill/resume case must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(_args(tiny_dir, shapes, out, *RUN)) == 0
    return out


@pytest.fixture(scope="module")
def stopped(tiny_dir, shapes, tmp_path_factory) -> Path:
    """A run of RUN stopped after step 2 (checkpoints 1 and 2 on disk); copy before use."""
    from sdxl.cli.train import build_parser, config_from_args
    from sdxl.train.loop import train
    from tests.interrupt import killed_after_step

    out = tmp_path_factory.mktemp("stopped") / "out"
    cfg = config_from_args(build_parser().parse_args(_args(tiny_dir, shapes, out, *RUN)))
    with killed_after_step(2):
        train(cfg)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------ Data


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One folder with every bad-item kind of test_data plus the catalogue's extras."""
    from PIL import Image

    from tests.test_data import _broken_dataset, _pair

    root = tmp_path_factory.mktemp("bad") / "data"
    root.mkdir()
    expected = _broken_dataset(root)
    expected.pop("long.png")  # a warning only with a tokenizer; the trainer keeps the item
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("zero bytes")
    _pair(root, "onepixel.png", "one pixel", size=(1, 1), seed=20)
    Image.new("I;16", (64, 64), 40000).save(root / "grey16.png")
    (root / "grey16.txt").write_text("a grey square")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("a red square")
    for junk in (".DS_Store", "Thumbs.db", "._good1.png"):
        (root / junk).write_bytes(b"\0\1junk")
    (root / "loop").symlink_to(root, target_is_directory=True)
    expected.update({"zero.png": "undecodable_image", "onepixel.png": "too_small"})
    return root, expected


def test_bad_items_are_skipped_listed_and_the_rest_trains(tiny_dir, bad_data, tmp_path, capsys):
    import pandas as pd

    root, expected = bad_data
    out = tmp_path / "out"
    code, err = _cli(capsys, _args(tiny_dir, root, out, "--max_steps", "1"))
    assert code == 0 and "error:" not in err
    problems = pd.read_csv(out / "cache" / "problems.tsv", sep="\t")
    assert dict(zip(problems["file"], problems["kind"], strict=True)) == expected
    meta = json.loads((out / "cache" / "latents" / "index.json").read_text())
    sources = sorted({r["source"] for r in meta["items"]})  # converted modes are kept
    assert sources == ["cmyk.jpg", "good1.png", "good2.jpg", "grey16.png", "long.png",
                       "sub/good3.webp"]  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "not_a_folder", "empty", "all_bad"])
def test_unusable_data_dir_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, case):
    data = tmp_path / "data"
    if case == "not_a_folder":
        data.write_text("x")
    elif case != "missing":
        data.mkdir()
    if case == "all_bad":
        (data / "garbage.png").write_bytes(b"not a png")
        (data / "garbage.txt").write_text("garbage")
    words = {"missing": "no such folder", "not_a_folder": "not a folder",
             "empty": "no images found", "all_bad": "no usable items left"}  # fmt: skip
    out = tmp_path / "out"
    _one_line(*_cli(capsys, _args(tiny_dir, data, out)), str(data), words[case])
    assert not out.exists()


def test_edited_dataset_rebuilds_the_cache_and_equals_a_fresh_run(
    tiny_dir, shapes, tmp_path, caplog
):
    """Caption edited, image added, --image_size changed: each rerun equals a fresh folder."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    out = tmp_path / "out"
    first = next(data.glob("*.txt"))
    extra = next(p for p in sorted((ROOT / "examples" / "shapes").glob("*.png"))
                 if not (data / p.name).exists())  # fmt: skip
    edits = [
        ("changed", lambda: first.write_text("an edited, much longer caption than before")),
        ("added", lambda: [shutil.copy(extra, data / extra.name),
                           shutil.copy(extra.with_suffix(".txt"), data / f"{extra.stem}.txt")]),
        ("image_size 64 -> 128", lambda: None),
    ]  # fmt: skip
    size = ["--max_steps", "2"]
    assert main(_args(tiny_dir, data, out, *size)) == 0
    for k, (what, edit) in enumerate(edits):
        edit()
        if what.startswith("image_size"):
            size = ["--max_steps", "2", "--image_size", "128"]
        caplog.clear()
        assert main(_args(tiny_dir, data, out, *size)) == 0
        assert any("rebuilding the cache" in r.message and what in r.message
                   for r in caplog.records), what  # fmt: skip
        fresh = tmp_path / f"fresh{k}"
        assert main(_args(tiny_dir, data, fresh, *size)) == 0
        _assert_same_lora(fresh, out)
    config = json.loads((out / "config.json").read_text())
    index = json.loads((out / "cache" / "latents" / "index.json").read_text())
    assert config["image_size"] == index["image_size"] == 128


# ------------------------------------------------------------------------------ Weights


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _partial_model(tiny_dir: Path, folder: Path, keep_out: str) -> Path:
    """A model folder linking tiny_dir's parts, except `keep_out` (copied, to be broken)."""
    folder.mkdir()
    for part in tiny_dir.iterdir():
        if part.name != keep_out:
            (folder / part.name).symlink_to(part)
        elif part.is_dir():
            shutil.copytree(part, folder / part.name)
    return folder


@pytest.mark.parametrize("case", ["missing", "no_index", "random_bytes", "sd15", "truncated"])
def test_bad_weights_are_one_line(tiny_dir, shapes, tmp_path, capsys, monkeypatch, case):
    _no_network(monkeypatch)
    model = tmp_path / "model"
    if case == "no_index":
        _partial_model(tiny_dir, model, "model_index.json")
    elif case == "random_bytes":
        model = tmp_path / "model.safetensors"
        model.write_bytes(os.urandom(4096))
    elif case == "sd15":
        _partial_model(tiny_dir, model, "model_index.json")
        index = json.loads((tiny_dir / "model_index.json").read_text())
        (model / "model_index.json").write_text(
            json.dumps({**index, "_class_name": "StableDiffusionPipeline"})
        )
    elif case == "truncated":
        _partial_model(tiny_dir, model, "text_encoder")
        weights = next((model / "text_encoder").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    words = {"missing": "no such model folder", "no_index": "model_index.json",
             "random_bytes": "model.safetensors", "sd15": "not an SDXL base model",
             "truncated": "text_encoder"}  # fmt: skip
    args = _args(tiny_dir, shapes, tmp_path / "out", "--max_steps", "1")
    args[args.index("--pretrained_model") + 1] = str(model)
    _one_line(*_cli(capsys, args), words[case])


# ------------------------------------------------------------------------------ Training faults


def _pause_and_kill(args: list[str], point: str, tmp_path: Path) -> None:
    """Run train_sdxl.py until it reaches pause `point`, then SIGKILL it."""
    marker = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_AT: point, PAUSE_FILE: str(marker)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sdxl.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the trainer never reached the pause point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.parametrize(
    ("point", "logged"),
    [
        ("cache", "is complete; skipping it"),  # latents done, text cache not started
        ("step-3", "resuming from step 2"),  # mid-step, after checkpoints 1 and 2
        # The temp file of checkpoint 2 written, not renamed:
        ("checkpoint:checkpoint-step0000002.pt", "resuming from step 1"),
    ],
)
def test_kill_9_then_rerun_equals_the_uninterrupted_run(
    tiny_dir, shapes, reference, tmp_path, caplog, point, logged
):
    out = tmp_path / "out"
    args = _args(tiny_dir, shapes, out, *RUN)
    _pause_and_kill(args, point, tmp_path)
    assert main(args) == 0
    assert any(logged in r.message for r in caplog.records), point
    assert not list(out.rglob("*.tmp"))
    _assert_same_lora(reference, out)


def test_kill_9_of_a_ddp_launch_kills_torchrun_and_every_rank(tiny_dir, shapes, tmp_path):
    """The pipeline's multi-GPU path (run_training -> torchrun -> ranks): killing the launcher
    mid-step leaves no process writing on, and a rerun takes the folder and completes."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    args = _args(tiny_dir, shapes, out, *RUN)
    launch = ("import sys; from sdxl.cli.train import build_parser, config_from_args; "
              "from sdxl.train.launch import run_training; "
              "run_training(config_from_args(build_parser().parse_args(sys.argv[1:])), 2)")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_AT: "step-1", PAUSE_FILE: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", launch, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks never reached step 1"
            time.sleep(0.1)
        tree = child_pids(proc.pid)
        assert len(tree) >= 3, tree  # torchrun and its two ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(is_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if is_alive(p)], "processes of the killed launch live on"
    finally:  # a failed assertion must not leave paused trainers behind
        for pid in tree | child_pids(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert main(args) == 0


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(
    tiny_dir, shapes, stopped, reference, tmp_path, caplog
):
    out = _copy(stopped, tmp_path)
    newest = out / "checkpoints" / "checkpoint-step0000002.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    assert main(_args(tiny_dir, shapes, out, *RUN)) == 0
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(newest) in m and "falling back" in m for m in warned)
    assert any("resuming from step 1" in r.message for r in caplog.records)
    _assert_same_lora(reference, out)


def test_temp_files_of_a_killed_run_are_removed(tiny_dir, shapes, stopped, tmp_path, caplog):
    out = _copy(stopped, tmp_path)
    litter = [out / ".lora_final.safetensors.a1.tmp", out / "cache" / "text" / ".shard-00000.b2.tmp",
              out / "checkpoints" / ".checkpoint-step0000003.pt.c3.tmp"]  # fmt: skip
    for path in litter:
        path.write_bytes(b"")
    assert main(_args(tiny_dir, shapes, out, *RUN)) == 0
    assert not any(p.exists() for p in litter)
    assert any("removed 3 temp file(s)" in r.message for r in caplog.records)


def test_resume_with_changed_learning_settings_is_one_line(
    tiny_dir, shapes, stopped, tmp_path, capsys
):
    out = _copy(stopped, tmp_path)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = _args(tiny_dir, shapes, out, *RUN, "--learning_rate", "2e-3", "--lora_rank", "3")
    _one_line(
        *_cli(capsys, args), "learning_rate: 0.001 -> 0.002", "lora_rank", "--resume_from none"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_old_one(
    tiny_dir, shapes, stopped, tmp_path, capsys, monkeypatch
):
    from sdxl.train import checkpoint

    out = _copy(stopped, tmp_path)
    old = out / "checkpoints" / "checkpoint-step0000002.pt"
    old_bytes = old.read_bytes()

    def full_disk(state, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    monkeypatch.setattr(checkpoint, "_free", lambda folder: 1000)
    line = _one_line(*_cli(capsys, _args(tiny_dir, shapes, out, *RUN)), "no space left",
                     str(out / "checkpoints"), "MiB")  # fmt: skip
    assert "checkpoint-step0000003.pt" in line
    assert old.read_bytes() == old_bytes and not list(out.rglob("*.tmp"))


def test_out_of_memory_names_bucket_batch_and_options(
    tiny_dir, shapes, stopped, tmp_path, capsys, monkeypatch
):
    from sdxl.train import loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "per_sample_loss", oom)
    out = _copy(stopped, tmp_path)
    _one_line(*_cli(capsys, _args(tiny_dir, shapes, out, *RUN)), "bucket 64x64",
              "--batch_size 2", "--gradient_checkpointing", "--image_size")  # fmt: skip


def test_second_trainer_into_a_busy_folder_is_refused(tiny_dir, shapes, stopped, tmp_path, capsys):
    from sdxl.procs import folder_lock

    out = _copy(stopped, tmp_path)
    with folder_lock(out):
        _one_line(*_cli(capsys, _args(tiny_dir, shapes, out, *RUN)), str(out), "another process")


def test_zero_steps_is_an_error_not_an_untrained_lora(tiny_dir, stopped, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(stopped / "cache", cache)
    index = json.loads((cache / "latents" / "index.json").read_text())
    (cache / "latents" / "index.json").write_text(json.dumps({**index, "items": [], "count": 0}))
    out = tmp_path / "out"
    _one_line(*_cli(capsys, _args(tiny_dir, cache, out)), "no training samples")
    assert not (out / "config.json").exists() and not (out / "lora_final.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--resume_from", "/nonexistent/ck.pt"], ["--resume_from /nonexistent/ck.pt"]),
        (["--prediction_type", "v_prediction"], ["--prediction_type", "scheduler_config.json"]),
        (["--timestep_max", "2000"], ["--timestep_max 2000", "1000 timesteps"]),
        (["--validation_caption_file", "/nonexistent.txt"], ["--validation_caption_file"]),
        (["--strict_data"], ["drop --strict_data"]),
    ],
)
def test_bad_flags_are_one_line_before_any_work(tiny_dir, bad_data, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    _one_line(*_cli(capsys, _args(tiny_dir, bad_data[0], out, *extra)), *words)
    assert not out.exists()  # failed before the cache was built


def test_debug_shows_the_traceback(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path / "missing", tmp_path / "out", "--debug")
    with pytest.raises(UserError, match="no such folder"):
        main(args)
