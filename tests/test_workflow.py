"""The Snakemake workflow: the tiny demo DAG runs for real, then reruns are exactly scoped.

The demo DAG runs once per module in a copy of the workflow (`finished`); each scenario
then edits a copy of that finished folder (or only the config, through the API) and asks a
dry run which outputs would be rebuilt (`updated_files`), as snakemake itself decides.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOW = ["Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
            "profiles", "report", "sdxl", "examples"]  # fmt: skip
DEMO_CONFIG = "profiles/demo/demo-config.yaml"
# Output path prefix -> the rule that writes it.
RULE_OF = [
    ("results/weights/", "weights"),
    ("results/data/", "validate_captions"),
    ("results/cache/latents/index.json", "merge_latents"),
    ("results/cache/latents/", "cache_latents"),
    ("results/cache/text/", "cache_text"),
    ("results/train/", "train_lora"),
    ("results/generate/", "generate"),
    ("results/dataset/", "assemble"),
    ("results/report/", "report"),
    ("results/config.json", "record_config"),
]
AFTER_TRAIN = {"train_lora", "generate", "assemble", "report"}
CONFIG_EDIT = {"record_config", "report"}  # any config edit: the config snapshot and page
# Hostile strings in every user-controlled field of the demo run: the report must show them
# escaped, never run them (tests/test_reliability_workflow.py parses the report).
HOSTILE = "</script><img src=x onerror=alert({})>"
HOSTILE_DATA_DIR = "examples/<img src=x onerror=alert(1)>"
HOSTILE_CONFIG = {
    "data": {"dir": HOSTILE_DATA_DIR},
    "generate": {"negative_prompt": HOSTILE.format(2),
                 "prompts_file": "examples/<img src=x onerror=alert(3)>.txt"},
    "train": {"validation_prompts": [HOSTILE.format(4) + " a red circle",
                                     "a blue square on a black background"]},
}  # fmt: skip
# The HF_TOKEN of the demo run: it must never be written anywhere.
TOKEN = "hf_NeverWrittenAnywhere0123456789"


def _env() -> dict:
    """CPU only (SDXL_GPUS empty), one thread per job, no stray CUDA mask."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "SDXL_GPUS": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def snakemake(
    workdir: Path, *args: str, timeout: int = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the snakemake CLI in `workdir` (targets first: later options take several values).

    Under umask 022, whatever the test runner's: files written must then be 0644.
    """
    cmd = [str(BIN / "snakemake"), *args]
    result = subprocess.run(cmd, cwd=workdir, env={**_env(), **(env or {})}, capture_output=True,
                            text=True, timeout=timeout, umask=0o022)  # fmt: skip
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow as a user's checkout would have it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def clone(finished: Path, dest: Path) -> Path:
    """A copy of a finished run (results and .snakemake metadata, mtimes kept)."""
    shutil.copytree(finished, dest, symlinks=True)
    return dest


def rule_of(path: str) -> str:
    return next(rule for prefix, rule in RULE_OF if path.startswith(prefix))


def would_run(workdir: Path, config: dict | None = None) -> set[str]:
    """The rules a dry run of the demo would run now (config: overrides, deep-merged)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    updated: list[str] = []
    cwd = Path.cwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(
                    configfiles=[workdir / DEMO_CONFIG], config=config or {}
                ),
                snakefile=workdir / "Snakefile",
                workdir=workdir,
            )
            dag = workflow.dag(DAGSettings(targets={"all"}))
            dag.execute_workflow(executor="dryrun", updated_files=updated)
    finally:
        os.chdir(cwd)
    return {rule_of(os.path.relpath(p, workdir) if os.path.isabs(p) else p) for p in updated}


def add_hostile_inputs(workdir: Path) -> None:
    """Hostile strings in the demo's config, prompt file and dataset (names and captions)."""
    demo = workdir / DEMO_CONFIG
    config = yaml.safe_load(demo.read_text())
    for section, values in HOSTILE_CONFIG.items():
        config[section].update(values)
    demo.write_text(yaml.safe_dump(config, sort_keys=False))
    prompts = (workdir / "examples/prompts.txt").read_text()
    (workdir / HOSTILE_CONFIG["generate"]["prompts_file"]).write_text(
        HOSTILE.format(5) + " a green triangle\n" + prompts
    )
    data = workdir / HOSTILE_DATA_DIR
    shutil.copytree(workdir / "examples/shapes", data)
    # A valid image whose caption is too long (a warning row of the problems table) ...
    from PIL import Image, ImageOps

    with Image.open(data / "00_red_circle.png") as image:
        ImageOps.invert(image.convert("RGB")).save(data / "zz_hostile.png")
    (data / "zz_hostile.txt").write_text(HOSTILE.format(6) + " a red circle" * 40 + "\n")
    # ... and a file named like markup that is not an image (a dropped item).
    (data / "<img src=x onerror=alert(7)>.png").write_text("not an image")
    (data / "<img src=x onerror=alert(7)>.txt").write_text("a caption\n")


def _demo_run(tmp_path_factory) -> Path:
    """The demo run, once per test session (also used by tests/test_reliability_workflow.py)."""
    global _DEMO
    if _DEMO is None:
        workdir = copy_workflow(tmp_path_factory.mktemp("workflow") / "run")
        add_hostile_inputs(workdir)
        snakemake(workdir, "--profile", "profiles/demo", "--resources", "gpu=2", "--cores", "2",
                  env={"HF_TOKEN": TOKEN})  # fmt: skip
        _DEMO = workdir
    return _DEMO


_DEMO: Path | None = None


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """The whole demo DAG, run once for real with the README's command (plus 2 GPU tokens),
    on a dataset and config with hostile strings (see add_hostile_inputs)."""
    return _demo_run(tmp_path_factory)


def test_demo_dag_produces_every_artifact(finished):
    results = finished / "results"
    manifest = json.loads((results / "weights/manifest.json").read_text())
    assert manifest["kind"] == "tiny" and len(manifest["files"]) > 10
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])
    with (results / "data/manifest.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 33  # the 32 shapes and zz_hostile.png
    assert (results / "cache/latents/index.json").is_file() and (
        results / "cache/text/index.json"
    ).is_file()
    run = results / "train/demo"
    for name in ("lora_final.safetensors", "lora_final.pt", "config.json", "metrics.csv"):
        assert (run / name).is_file(), name
    with (run / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    coco = json.loads((results / "dataset/captions.json").read_text())
    assert [im["id"] for im in coco["images"]] == list(range(8))
    assert all((results / "dataset" / im["file_name"]).is_file() for im in coco["images"])
    assert (results / "dataset/contact_sheet.png").is_file()
    assert "<polyline" in (results / "report/loss_curve.svg").read_text()
    assert list((results / "report/validation").glob("*.png"))  # the validation grid
    assert (results / "report/problems.html").is_file()
    assert (results / "report/contact_sheet.png").is_file()
    assert json.loads((results / "config.json").read_text())["run"] == "demo"
    assert (results / "report.html").stat().st_size > 10_000


def test_nothing_changed_reruns_nothing(finished):
    assert would_run(finished) == set()


def test_training_setting_reruns_training_and_after(finished):
    assert would_run(finished, {"train": {"learning_rate": 2.0e-3}}) == AFTER_TRAIN | CONFIG_EDIT


def test_gpu_count_reruns_training_and_after(finished):
    """batch_size is per GPU: another GPU count is another global batch, another LoRA."""
    assert would_run(finished, {"train": {"gpus": 2}}) == AFTER_TRAIN | CONFIG_EDIT


def test_generation_setting_reruns_generation_and_after(finished):
    assert would_run(finished, {"generate": {"guidance_scale": 3.0}}) == {
        "generate",
        "assemble",
        "record_config",
        "report",
    }


def test_latent_setting_reruns_latents_and_after(finished):
    got = would_run(finished, {"cache": {"latents": {"image_size": 192}}})
    # not weights, validation, text
    assert got == {"cache_latents", "merge_latents"} | AFTER_TRAIN | CONFIG_EDIT


def test_added_image_reruns_validation_and_after(finished, tmp_path):
    from PIL import Image, ImageOps

    work = clone(finished, tmp_path / "run")
    shapes = work / HOSTILE_DATA_DIR
    with Image.open(shapes / "00_red_circle.png") as im:
        ImageOps.mirror(ImageOps.flip(im)).rotate(45, fillcolor="white").save(shapes / "99_new.png")
    (shapes / "99_new.txt").write_text("a rotated red circle on a white background\n")
    expected = {"validate_captions", "cache_latents", "merge_latents", "cache_text"} | AFTER_TRAIN
    assert would_run(work) == expected


def test_library_code_change_reruns_only_its_stages(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    writers = work / "sdxl/generate/writers.py"
    writers.write_text(writers.read_text() + "\n# an edit\n")
    # report: it shows a copy of the contact sheet that assemble writes
    assert would_run(work) == {"generate", "assemble", "report"}


def test_killed_training_resumes_from_its_checkpoint(finished, tmp_path):
    from safetensors.torch import load_file

    work = clone(finished, tmp_path / "run")
    run = work / "results/train/demo"
    # What a first run killed during training, after its step-2 checkpoint, leaves behind.
    for name in ("lora_final.safetensors", "lora_final.pt", "config.json", "checkpoint_final.pt"):
        (run / name).unlink()
    (run / "checkpoints/checkpoint-step0000004.pt").unlink()
    for later in ("results/generate", "results/dataset", "results/report"):
        shutil.rmtree(work / later)
    with (run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= 2]
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert would_run(work) == AFTER_TRAIN
    snakemake(
        work,
        "results/train/demo/lora_final.safetensors",
        "--profile",
        "profiles/demo",
        "--cores",
        "2",
    )
    log = (work / "results/logs/train_lora/demo.log").read_text()
    assert "resumed from results/train/demo/checkpoints/checkpoint-step0000002.pt at step 2" in log
    with (run / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    before = load_file(finished / "results/train/demo/lora_final.safetensors")
    after = load_file(run / "lora_final.safetensors")
    assert before.keys() == after.keys()
    assert all(before[k].equal(after[k]) for k in before)  # resuming is exact


def test_changed_job_restarts_instead_of_resuming(tmp_path):
    sys.path.insert(0, str(ROOT / "workflow_scripts"))
    try:
        from common import FINGERPRINT, resume_or_restart
    finally:
        sys.path.remove(str(ROOT / "workflow_scripts"))
    folder = tmp_path / "run"
    assert not resume_or_restart(folder, "a")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints/checkpoint-step0000002.pt").write_text("x")
    assert resume_or_restart(folder, "a")
    assert (folder / "checkpoints/checkpoint-step0000002.pt").exists()
    assert not resume_or_restart(folder, "b")  # other inputs or settings: start over
    assert (
        not (folder / "checkpoints").exists() and (folder / FINGERPRINT).read_text().strip() == "b"
    )


def test_bad_config_value_fails_at_parse_time_naming_the_key(tmp_path):
    work = copy_workflow(tmp_path / "run")
    (work / "bad.yaml").write_text(yaml.safe_dump({"train": {"learning_rate": -1.0}}))
    cmd = [str(BIN / "snakemake"), "-n", "--configfile", "bad.yaml"]
    result = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "learning_rate" in result.stdout + result.stderr


def test_dataset_scan_matches_the_library(tmp_path):
    """rules/common.smk lists the dataset files itself (fast parse); both must agree."""
    from sdxl.data.dataset import scan_dataset

    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in (
        "a.PNG",
        "a.txt",
        "sub/b.jpeg",
        "sub/b.txt",
        ".hidden/c.png",
        ".d.png",
        "e.gif",
        "f.webp",
    ):
        (root / name).write_text("x")
    namespace = {"config": {"data": {"dir": str(root)}}}
    source = (ROOT / "rules/common.smk").read_text()
    start = source.index("DATA_SUFFIXES =")
    exec(source[start : source.index("\n", start)], namespace)  # the suffix constant
    func = source[source.index("def dataset_files") : source.index("\ndef train_settings")]
    exec("import os\n" + func, namespace)
    images, captions = scan_dataset(root)
    expected = sorted(str(root / p) for p in (*images, *captions))
    assert sorted(namespace["dataset_files"](None)) == expected


def test_lint_is_clean():
    result = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip(
        "snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm not installed"
    )
    work = copy_workflow(tmp_path / "run")
    result = snakemake(work, "--workflow-profile", "profiles/slurm", "-n", timeout=300)
    assert "train_lora" in result.stdout + result.stderr


def test_slurm_profile_targets_real_rules():
    """Without the plugin at hand: the profile only names rules that exist, and GPU requests
    use either `gpu` or `gres`, never both (the plugin rejects that)."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.v8+.yaml").read_text())
    rules = {"weights", "validate_captions", "cache_latents", "merge_latents", "cache_text", "train_lora",
             "generate", "assemble", "report"}  # fmt: skip
    text = "".join((ROOT / "rules").joinpath(f).read_text() for f in os.listdir(ROOT / "rules"))
    assert all(f"rule {r}:" in text for r in rules)
    assert set(profile["set-resources"]) <= rules and set(profile["set-threads"]) <= rules
    for rule, resources in profile["set-resources"].items():
        assert not ("gpu" in resources and "gres" in resources), rule
    assert profile["executor"] == "slurm" and "gpu" in profile["resources"]


def test_two_gpu_training_runs_ddp_and_matches_one_process(finished, tmp_path):
    """train_lora with gpu=2 goes through torchrun; on CPU (gloo), 2 processes at batch b/2
    train what one process does at batch b (batch_size is per GPU)."""
    from safetensors.torch import load_file

    from sdxl.train.config import TrainConfig
    from sdxl.train.launch import run_training

    run = finished / "results/train/demo"
    settings = json.loads((run / "config.json").read_text())
    settings.update(
        data_dir=str(finished / "results/cache"),
        output_dir=str(tmp_path / "ddp"),
        pretrained_model=str(finished / "results/weights/model"),
        validation_interval=0,
        batch_size=settings["batch_size"] // 2,
    )  # per GPU: the same global batch
    run_training(TrainConfig.from_dict(settings), num_gpus=2)
    with (run / "metrics.csv").open() as a, (tmp_path / "ddp/metrics.csv").open() as b:
        one, two = ([float(r["loss"]) for r in csv.DictReader(f)] for f in (a, b))
    assert two == pytest.approx(one, abs=1e-5)
    before, after = (
        load_file(run / "lora_final.safetensors"),
        load_file(tmp_path / "ddp/lora_final.safetensors"),
    )
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-3
