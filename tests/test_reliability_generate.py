"""The reliability catalogue (../shared/notes/reliability.md) as generate_images.py sees it.

Weights, LoRA files and generation faults: each bad input ends the command with exactly one
`error:` line naming the file and the fix, and nothing already in the output folder is lost.
Kill -9 of a run (one worker, two CPU workers) leaves no process behind, and a rerun finishes
it with the same bytes as an uninterrupted run. The CLI runs in-process except where it is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdxl.cli.generate import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "64", "--num-inference-steps", "2", "--device", "cpu", "--seed", "3"]
PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow heart"]


def _args(model, out, *extra: str) -> list[str]:
    return ["--pretrained-model", str(model), "--output-dir", str(out), *FAST, *extra]


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI expecting failure; return its single `error:` line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def made(tiny_dir, prompt_file, tmp_path_factory) -> Path:
    """A finished dataset that every failing command below is pointed at."""
    out = tmp_path_factory.mktemp("made") / "dataset"
    assert main(_args(tiny_dir, out, "--prompt-file", str(prompt_file), "--num-images", "4")) == 0
    return out


@pytest.fixture
def fails_into(made, capsys):
    """Run a failing command into `made`; check the one line, and that nothing was lost."""
    before = _snapshot(made)

    def run(model, *extra: str) -> str:
        line = _one_error_line(capsys, _args(model, made, "--prompt", "x", *extra))
        assert _snapshot(made) == before
        return line

    return run


# ----------------------------------------------------------------------------- weights


def _sd15_keys() -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}  # fmt: skip


SINGLE_FILES = {  # name -> (tensors, expected words)
    "sd15": (_sd15_keys(), "Stable Diffusion 1.x"),
    "sd2": ({"cond_stage_model.model.token_embedding.weight": torch.zeros(2)}, "2.x"),
    "refiner": (
        {
            "conditioner.embedders.0.model.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(2),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2),
        },  # fmt: skip
        "SDXL refiner",
    ),
}
FOLDERS = {  # name -> (model_index.json, expected words)
    "sd15-folder": ({"_class_name": "StableDiffusionPipeline"}, "StableDiffusionPipeline"),
    "refiner-folder": (
        {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "text_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "without text_encoder",
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def bad_models(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    models = {"missing": root / "nope", "no-index": root / "no-index"}
    models["no-index"].mkdir()
    for name in ("random.safetensors", "random.bin"):
        models[name] = root / name
        models[name].write_bytes(os.urandom(4096))
    for name, (tensors, _) in SINGLE_FILES.items():
        save_file(tensors, str(root / f"{name}.safetensors"))
        models[name] = root / f"{name}.safetensors"
    for name, (index, _) in FOLDERS.items():
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(json.dumps(index))
        models[name] = root / name
    truncated = root / "truncated"
    shutil.copytree(tiny_dir, truncated)
    unet = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    models["truncated"] = truncated
    return models


WEIGHTS_CASES = {
    "missing": ["no such model folder or file", "download_weights.sh"],
    "no-index": ["model_index.json: missing", "download the model again"],
    "truncated": ["diffusion_pytorch_model.safetensors", "delete it and download it again"],
    "random.safetensors": ["random.safetensors: cannot read safetensors", "download it again"],
    "random.bin": ["only .safetensors single files", "convert it"],
    **{name: [words, "SDXL base"] for name, (_, words) in SINGLE_FILES.items()},
    **{name: [words, "not an SDXL base model"] for name, (_, words) in FOLDERS.items()},
}


@pytest.mark.parametrize("case", list(WEIGHTS_CASES))
def test_bad_weights_are_one_line_before_any_download(bad_models, fails_into, monkeypatch, case):
    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted for a file that is not a model")

    monkeypatch.setattr("sdxl.hub.download_sdxl", no_network)
    line = fails_into(bad_models[case])
    assert str(bad_models[case].name) in line
    for words in WEIGHTS_CASES[case]:
        assert words in line


# ----------------------------------------------------------------------------- LoRA files


class _Payload:
    """Pickles as a call that would create `marker` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _kohya(name: str, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"lora_unet_{name}.{k.replace('__', '.')}": v for k, v in tensors.items()}


LORA_CASES = {  # name -> (writer(path), expected words)
    "missing": (None, "file not found"),
    "garbage": (lambda p: p.write_bytes(os.urandom(256)), "cannot read the safetensors file"),
    "other-model-keys": (
        lambda p: save_file(
            _kohya(
                "input_blocks_99_1_proj_in",
                lora_down__weight=torch.zeros(4, 8),
                lora_up__weight=torch.zeros(8, 4),
            ),
            str(p),
        ),
        "not a module of this UNet",
    ),  # fmt: skip
    "sd15-metadata": (
        lambda p: save_file(
            _kohya("input_blocks_1_1_proj_in", lora_down__weight=torch.zeros(4, 320)),
            str(p),
            metadata={"ss_base_model_version": "sd_v1"},
        ),
        "sd_v1",
    ),  # fmt: skip
    "loha": (
        lambda p: save_file(
            _kohya("input_blocks_1_1_proj_in", hada_w1_a=torch.zeros(4, 4)), str(p)
        ),
        "LoHa",
    ),  # fmt: skip
    "lokr": (
        lambda p: save_file(_kohya("input_blocks_1_1_proj_in", lokr_w1=torch.zeros(4, 4)), str(p)),
        "LoKr",
    ),  # fmt: skip
}  # (DoRA files are supported: tests/test_dora.py)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_bad_lora_files_are_one_line(tiny_dir, tmp_path, fails_into, case):
    write, words = LORA_CASES[case]
    lora = tmp_path / f"{case}.safetensors"
    if write is not None:
        write(lora)
    line = fails_into(tiny_dir, "--lora-checkpoint", str(lora))
    assert lora.name in line and words in line


def test_lora_with_wrong_shapes_is_one_line(tiny_dir, tmp_path, fails_into):
    from sdxl.lora_formats.kohya import save_kohya
    from sdxl.pipeline import load_pipeline

    unet = load_pipeline(tiny_dir).unet
    path = next(n for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    width = dict(unet.named_modules())[path].in_features
    state = {f"{path}.lora_down.weight": torch.zeros(4, width + 1),  # one input too many
             f"{path}.lora_up.weight": torch.zeros(width, 4), f"{path}.alpha": torch.tensor(4.0)}  # fmt: skip
    save_kohya(tmp_path / "shapes.safetensors", state)
    line = fails_into(tiny_dir, "--lora-checkpoint", str(tmp_path / "shapes.safetensors"))
    assert "shapes.safetensors" in line and "shape" in line


def test_pickled_lora_with_a_code_payload_never_runs(tiny_dir, tmp_path, fails_into):
    marker = tmp_path / "payload-ran"
    torch.save({"lora_state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    line = fails_into(tiny_dir, "--lora-checkpoint", str(tmp_path / "evil.pt"))
    assert "evil.pt" in line and "could run code" in line and "weights_only" not in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "prompt file not found; give --prompt-file an existing file"),
        (b"\n   \n\n", "has no prompts"),
        (b"caf\xe9 au lait\n", "not valid UTF-8"),
    ],  # fmt: skip
    ids=["missing", "only-blanks", "non-utf8"],
)
def test_bad_prompt_files_are_one_line(made, capsys, tmp_path, tiny_dir, content, words):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    before = _snapshot(made)
    line = _one_error_line(capsys, _args(tiny_dir, made, "--prompt-file", str(path)))
    assert "prompts.txt" in line and words in line
    assert _snapshot(made) == before


def test_blank_lines_are_skipped_and_prompts_cycle(made):
    captions = json.loads((made / "captions.json").read_text())["annotations"]
    assert [a["caption"] for a in captions] == PROMPTS
    assert [(made / f"0000{i}.txt").read_text() for i in range(4)] == PROMPTS


def test_prompts_never_reach_file_names(tiny_dir, tmp_path):
    out = tmp_path / "out"
    hostile = "../../escape/<evil>:*?|\\ a /etc/passwd"
    assert main(_args(tiny_dir, out, "--prompt", hostile, "--num-images", "2")) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [".lock", "00000.png", "00000.txt", "00001.png", "00001.txt", "captions.json",
         "contact_sheet.png", "metadata.jsonl"])  # fmt: skip
    assert (out / "00000.txt").read_text() == hostile


def test_long_prompt_warning_names_the_image_index(tiny_dir, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" + "a red circle on a white background " * 20 + "\n")
    out = tmp_path / "out"
    main(_args(tiny_dir, out, "--prompt-file", str(prompts), "--num-images", "4"))
    assert "image 1:" in caplog.text and "image 3:" in caplog.text


# ----------------------------------------------------------------------------- generation faults


def test_second_writer_into_a_folder_refuses(made, capsys, tiny_dir, prompt_file):
    from sdxl.procs import folder_lock

    before = _snapshot(made)
    with folder_lock(made):  # a live run
        line = _one_error_line(capsys, _args(tiny_dir, made, "--prompt-file", str(prompt_file)))
    assert "another process" in line and str(made) in line
    assert _snapshot(made) == before


def test_temp_litter_is_removed_at_the_next_start(made, tiny_dir, prompt_file):
    before = _snapshot(made)
    for name in (".00002.png.x1y2.tmp", ".captions.json.abc.tmp"):
        (made / name).write_bytes(b"")
    assert main(_args(tiny_dir, made, "--prompt-file", str(prompt_file), "--num-images", "4")) == 0
    assert not list(made.glob("*.tmp")) and _snapshot(made) == before
    assert all(".tmp" not in line for line in (made / "metadata.jsonl").read_text().splitlines())


def test_a_failing_worker_fails_the_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "fail"
    out.mkdir()
    (out / "00001.png").mkdir()  # worker 1 (odd indices) cannot write its first image
    line = _one_error_line(capsys, _args(tiny_dir, out, "--prompt", "x", "--num-images", "4",
                                         "--num-gpus", "2"))  # fmt: skip
    assert "worker 1 (cpu) failed" in line and "00001.png" in line
    assert not (out / "captions.json").exists()
    assert (out / "00000.png").is_file() or (out / "00002.png").is_file()  # worker 0 kept its own


# ----------------------------------------------------------------------------- kill -9

KILL_ARGS = ["--prompt-file", "PROMPTS", "--num-images", "8", "--num-inference-steps", "4"]


def _kill_args(prompt_file: Path) -> list[str]:
    return [str(prompt_file) if a == "PROMPTS" else a for a in KILL_ARGS]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, prompt_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "dataset"
    assert main(_args(tiny_dir, out, *_kill_args(prompt_file))) == 0
    return out


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _workers(parent: int) -> list[int]:
    """The multiprocessing workers (not its resource tracker) that `parent` started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_for(condition, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while not (found := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_rerun_equals_the_uninterrupted_run(
    tiny_dir, prompt_file, tmp_path, uninterrupted, workers
):
    out = tmp_path / "killed"
    argv = _args(tiny_dir, out, *_kill_args(prompt_file))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads as this process: same pixels
    cmd = [sys.executable, str(ROOT / "generate_images.py"), *argv, "--num-gpus", str(workers)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        if workers > 1:
            pids = _wait_for(lambda: len(_workers(proc.pid)) == workers and _workers(proc.pid),
                             "the workers")  # fmt: skip
        _wait_for(lambda: list(out.glob("0*.png")), "the first image")
        for pid in pids or [proc.pid]:
            os.kill(pid, signal.SIGSTOP)  # freeze the run mid-way: the kill below finds work left
        assert len(list(out.glob("0*.png"))) < 8
        proc.kill()
        proc.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in pids), "the workers to die", 5.0)
    finally:
        for pid in (p for p in pids if _alive(p)):  # a survivor must not outlive the test
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert main(argv) == 0
    assert _snapshot(out) == _snapshot(uninterrupted)


def test_a_million_prompts_sort_in_order_and_plan_without_opening_files(tmp_path, monkeypatch):
    """1M prompts: file names sort in index order, and planning a fresh folder opens no PNG."""
    from sdxl.generate import run

    prompts = tuple(f"prompt {i % 1000}" for i in range(1_000_000))
    cfg = run.GenerateConfig(pretrained_model="builtin:tiny", output_dir=str(tmp_path / "out"),
                             prompts=prompts)  # fmt: skip
    stems = [cfg.file_stem(i) for i in (0, 9, 10, 99_999, 100_000, 999_999)]
    assert stems == sorted(stems) and {len(s) for s in stems} == {6}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{cfg.file_stem(3)}.png").write_bytes(b"not a png")  # a damaged one
    opened = []
    monkeypatch.setattr(run, "is_done", lambda path, meta: opened.append(path.name) or False)
    indices = list(range(200_000))
    assert run.pending_indices(cfg, indices) == indices
    assert opened == ["000003.png"]  # only the file that exists was looked at
