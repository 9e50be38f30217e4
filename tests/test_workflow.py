"""The Snakemake workflow: the tiny demo DAG runs for real, then reruns are exactly scoped.

The demo DAG runs once per module in a copy of the workflow (`finished`); each scenario
then edits a copy of that finished folder (or only the config, through the API) and asks a
dry run which outputs would be rebuilt (`updated_files`), as snakemake itself decides.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# The tests of the demo run (this module and its sibling share it) run on one xdist worker.
pytestmark = pytest.mark.xdist_group("demo")

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
    ("results/validation/", "validate_lora"),
    ("results/generate/", "generate"),
    ("results/dataset/", "assemble"),
    ("results/eval/generated/", "evaluate_features"),
    ("results/eval/reference/", "evaluate_reference"),
    ("results/eval/", "evaluate"),
    ("results/report/", "report"),
    ("results/config.json", "record_config"),
]
# The evaluation jobs of the demo's two generate shards.
EVAL_01 = {"evaluate_features:0", "evaluate_features:1", "evaluate"}
AFTER_TRAIN = {"train_lora", "validate_lora", "generate", "assemble", "evaluate_features",
               "evaluate", "report"}  # fmt: skip
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
    """A copy of a finished run (results and .snakemake metadata, mtimes and hard links kept:
    the dataset folder links the generated images)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(finished), str(dest)], check=True)
    return dest


def rule_of(path: str) -> str:
    if path.startswith(("results/benchmarks/", "results/logs/")):  # .../<rule>[/<wildcards>]
        return Path(path).parts[2].removesuffix(".tsv").removesuffix(".log")
    if path == "results/report.html":
        return "report"
    return next(rule for prefix, rule in RULE_OF if path.startswith(prefix))


def job_of(path: str) -> str:
    """The job that writes `path`: its rule, and its shard for the sharded rules (rule:K)."""
    rule = rule_of(path)
    shard = re.search(r"shard-(\d+)", path)
    sharded = ("generate", "cache_latents", "evaluate_features", "evaluate_reference")
    return f"{rule}:{int(shard[1])}" if shard and rule in sharded else rule


def would_run_jobs(workdir: Path, config: dict | None = None) -> set[str]:
    """The jobs (rule, or rule:shard) a dry run of the demo would run now (config: overrides,
    deep-merged)."""
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
    return {job_of(os.path.relpath(p, workdir) if os.path.isabs(p) else p) for p in updated}


def would_run(workdir: Path, config: dict | None = None) -> set[str]:
    """The rules a dry run of the demo would run now."""
    return {job.split(":")[0] for job in would_run_jobs(workdir, config)}


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
        trace = workdir.parent / "import-trace"  # what each job imported (see import_trace/)
        trace.mkdir()
        env = {"HF_TOKEN": TOKEN, "SDXL_IMPORT_TRACE": str(trace),
               "PYTHONPATH": str(ROOT / "tests/import_trace")}  # fmt: skip
        done = snakemake(workdir, "--profile", "profiles/demo", "--resources", "gpu=2",
                         "--cores", "2", env=env)  # fmt: skip
        (workdir.parent / "console.txt").write_text(done.stdout + done.stderr)
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
    assert (results / "report/validation_over_time.png").is_file()
    grids = json.loads((results / "validation/demo/index.json").read_text())["grids"]
    assert [g["step"] for g in grids] == [0, 2, 4]  # the base, then every validation_interval
    assert sorted(p.name for p in (results / "train/demo").glob("demo-step*")) == [
        "demo-step00000002.safetensors",
        "demo-step00000004.safetensors",
    ]
    assert (results / "report/problems.html").is_file()
    assert (results / "report/contact_sheet.png").is_file()
    assert json.loads((results / "config.json").read_text())["run"] == "demo"
    report = (results / "report.html").read_text()
    assert len(report) > 10_000
    # Every item has a named category and subcategory (Snakemake's default is "Other").
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", report).group(1))
    assert set(categories) == {"Training", "Validation", "Dataset", "Generated dataset",
                               "Evaluation", "Runtime", "Configuration"}  # fmt: skip
    assert all("Other" not in subs for subs in categories.values()), categories
    assert sum(len(items) for subs in categories.values() for items in subs.values()) == 10
    metrics = json.loads((results / "eval/metrics.json").read_text())
    assert metrics["n_images"] == 8 and metrics["reference"]["n_images"] == 33
    assert metrics["inception"]["model"] == "builtin:tiny-inception"
    assert metrics["clip_model"] == "builtin:tiny-clip"
    assert metrics["fid"] > 0 and metrics["clip_score"] is not None
    assert "FID" in (results / "report/evaluation.html").read_text()


def test_demo_logs_read_as_lines_and_name_what_each_job_wrote(finished):
    """No progress bar draws carriage returns into a log; each log's last line names the job's
    outputs; the console shows each job's progress and messages, no "Shell command: None"."""
    logs = sorted((finished / "results/logs").rglob("*.log"))
    assert len(logs) >= 14
    for log in logs:
        text = log.read_text()
        assert "\r" not in text, log
        assert text.splitlines()[-1].startswith("wrote "), (log, text[-500:])
    train = (finished / "results/logs/train_lora/demo.log").read_text()
    assert "starting from step 0" in train and "resuming" not in train
    assert re.search(r"^train: 4/4 steps \(100%\), .*done in .*loss=", train, re.M), train
    assert train.splitlines()[-1] == (
        "wrote results/train/demo/lora_final.safetensors, results/train/demo/lora_final.pt "
        "(LoRA rank 8, 4 steps)"
    )
    console = (finished.parent / "console.txt").read_text()
    assert "Shell command" not in console
    assert re.search(r"^\[train_lora\] 4/4 steps \(100%\)", console, re.M), console[-3000:]
    assert re.search(r"^\[generate shard-1\] 4/4 images \(100%\)", console, re.M)
    assert "Training the LoRA of run demo" in console and "continues from" not in console


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
        "evaluate_features",
        "evaluate",
        "record_config",
        "report",
    }


@pytest.mark.parametrize(
    "edit",
    [
        {"train": {"compile": True, "gradient_checkpointing": True, "checkpointing_mode": "selective",
                   "fused_qkv": True, "log_interval": 2, "checkpoint_steps": 1}},
        {"train": {"wandb_project": "elsewhere", "save_interval": 2}},
        {"generate": {"compile": False, "channels_last": True}},
    ],
    ids=["train-speed", "train-logging", "generate-speed"],
)  # fmt: skip
def test_speed_and_logging_settings_rerun_nothing_but_the_config_page(finished, edit):
    assert would_run(finished, edit) == CONFIG_EDIT


@pytest.mark.parametrize(
    "edit",
    [
        {"train": {"validation_prompts": ["a green triangle"]}},
        {"train": {"validation_steps": 3}},
        {"train": {"validation_guidance_scale": 2.0}},
        {"train": {"validation_interval": 4}},
        {"train": {"num_validation_images": 1}},
        {"train": {"sample_prompts": "examples/prompts.txt"}},
        {"train": {"sample_every_n_steps": 2, "validation_interval": 0}},
    ],
    ids=["prompts", "steps", "guidance", "interval", "count", "sample-prompts", "kohya-interval"],
)
def test_validation_settings_rerun_only_validation_and_the_report(finished, edit):
    assert would_run(finished, edit) == {"validate_lora"} | CONFIG_EDIT


@pytest.mark.parametrize(
    ("edit", "jobs"),
    [
        ({"generate": {"sampler": "ddim"}}, {"generate:0", "generate:1", "assemble"} | EVAL_01),
        ({"generate": {"num_images": 6}}, {"generate:1", "assemble", "evaluate_features:1",
                                           "evaluate"}),
        ({"generate": {"num_images": 12}}, {"generate:2", "assemble", "evaluate_features:2",
                                            "evaluate"}),
        ({"train": {"num_epochs": 2}}, {"train_lora", "validate_lora", "generate:0", "generate:1",
                                        "assemble"} | EVAL_01),
        ({"train": {"save_last_n": 1}}, {"train_lora", "validate_lora", "generate:0", "generate:1",
                                         "assemble"} | EVAL_01),
        ({"train": {"save_every_n_epochs": 1, "sample_every_n_epochs": 2}},
         {"train_lora", "validate_lora", "generate:0", "generate:1", "assemble"} | EVAL_01),
        ({"evaluate": {"kid_subsets": 3}}, {"evaluate"}),
        ({"evaluate": {"clip_model": None}}, {"evaluate_features:0", "evaluate_features:1",
                                              "evaluate"}),
        ({"evaluate": {"images_per_shard": 16}},  # 34 candidate images: 3 reference shards
         {"evaluate_reference:0", "evaluate_reference:1", "evaluate_reference:2", "evaluate"}),
    ],
    ids=["sampler", "fewer-images", "more-images", "epochs", "save-last-n", "epoch-samples",
         "kid-subsets", "no-clip", "reference-shards"],
)  # fmt: skip
def test_each_edit_schedules_exactly_its_jobs(finished, edit, jobs):
    assert would_run_jobs(finished, edit) == jobs | {"record_config", "report"}


def test_validation_interval_must_fall_on_snapshots(finished):
    with pytest.raises(Exception, match="must be a multiple of train.save_every_n_steps"):
        would_run(finished, {"train": {"validation_interval": 3}})


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
    expected = {"validate_captions", "cache_latents", "merge_latents", "cache_text",
                "evaluate_reference"} | AFTER_TRAIN  # fmt: skip
    assert would_run(work) == expected


def test_library_code_change_reruns_only_its_stages(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    writers = work / "sdxl/generate/writers.py"
    writers.write_text(writers.read_text() + "\n# an edit\n")
    # report: it shows a copy of the contact sheet that assemble writes
    assert would_run(work) == {"generate", "assemble", "evaluate_features", "evaluate", "report"}
    validation = work / "sdxl/train/validation.py"
    validation.write_text(validation.read_text() + "\n# an edit\n")
    assert would_run(work) == {"validate_lora", "generate", "assemble", "evaluate_features",
                               "evaluate", "report"}  # fmt: skip
    metrics = work / "sdxl/evaluate/metrics.py"
    metrics.write_text(metrics.read_text() + "\n# an edit\n")
    assert "evaluate_reference" in would_run(work)


def rule_code_inputs(workdir: Path) -> dict[str, set[str]]:
    """Each rule script's `code` inputs (workdir-relative), as the parsed workflow declares."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

    cwd = Path.cwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=[workdir / DEMO_CONFIG]),
                snakefile=workdir / "Snakefile",
                workdir=workdir,
            )
            rules = workflow._workflow.rules
            return {Path(r.script).stem: set(r.input["code"]) for r in rules if r.script}
    finally:
        os.chdir(cwd)


def test_code_inputs_hold_every_module_each_job_loaded(finished):
    """The code inputs are derived from each script's imports (sdxl/code_inputs.py); every
    repository module a job of the demo run loaded (traced) must be among its rule's, so that
    editing it reruns the job."""
    declared = rule_code_inputs(finished)
    loaded: dict[str, set[str]] = {}
    for record in (finished.parent / "import-trace").glob("*.json"):
        trace = json.loads(record.read_text())
        if not trace["job"]:
            continue  # snakemake itself (the workflow parse)
        ours = {os.path.relpath(f, finished) for f in trace["files"] if f.startswith(str(finished))}
        job = trace["job"].removesuffix(".py")
        loaded.setdefault(job, set()).update(
            f for f in ours if f.startswith(("sdxl/", "workflow_scripts/"))
        )
    assert set(loaded) == set(declared) - {"pack_webdataset"}  # the demo packs no tars
    for job, files in loaded.items():
        assert files <= declared[job], f"{job} loaded undeclared {sorted(files - declared[job])}"
    # Left out on purpose: the train job draws no grids (validate_lora does); only the weights
    # job makes the tiny model; a cache job depends on its own network alone.
    assert "sdxl/train/validation.py" not in declared["train_lora"]
    assert "sdxl/train/validation.py" in declared["validate_lora"]
    assert [job for job, files in declared.items() if "sdxl/tiny.py" in files] == ["weights"]
    assert "sdxl/models/unet.py" not in declared["cache_latents"] | declared["cache_text"]


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
    checkpoint = "results/train/demo/checkpoints/checkpoint-step0000002.pt"
    assert f"resuming from step 2 (checkpoint {checkpoint})" in log
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
    """The workflow lists the dataset files itself (a fast parse); both must agree."""
    from sdxl.data.dataset import scan_dataset
    from sdxl.workflow_inputs import dataset_files

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
        "f.caption",
    ):
        (root / name).write_text("x")
    config = {"data": {"dir": str(root), "subsets": []}}
    images, captions = scan_dataset(root)
    expected = sorted(str(root / p) for p in (*images, *captions))
    assert sorted(dataset_files(config)) == expected
    # data.subsets: each folder with its own caption extension
    config["data"]["subsets"] = [{"image_dir": str(root / "sub")},
                                              {"image_dir": str(root), "caption_extension": ".caption"}]  # fmt: skip
    found = [*scan_dataset(root / "sub")[0], *scan_dataset(root / "sub")[1]]
    expected = [str(root / "sub" / p) for p in found]
    images, captions = scan_dataset(root, ".caption")
    expected += [str(root / p) for p in (*images, *captions)]
    assert sorted(dataset_files(config)) == sorted(expected)


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
             "validate_lora", "generate", "assemble", "report"}  # fmt: skip
    text = "".join((ROOT / "rules").joinpath(f).read_text() for f in os.listdir(ROOT / "rules"))
    assert all(f"rule {r}:" in text for r in rules)
    assert set(profile["set-resources"]) <= rules and set(profile["set-threads"]) <= rules
    for rule, resources in profile["set-resources"].items():
        assert not ("gpu" in resources and "gres" in resources), rule
    assert profile["executor"] == "slurm" and "gpu" in profile["resources"]


# ---------------------------------------------------------------- what each edit reruns, for real
# Each test edits a copy of the finished demo the way a user would (the demo config or the
# prompt file), checks the exact jobs a dry run schedules, runs the README's command, and checks
# that every file of the jobs that did not run, and every kept image, grid and snapshot of the
# jobs that did, is the same file as before (inode, mtime and bytes).


def file_states(workdir: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under results/ (links not followed): (inode, mtime_ns, sha256)."""
    states = {}
    for path in (workdir / "results").rglob("*"):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            states[path.relative_to(workdir).as_posix()] = (st.st_ino, st.st_mtime_ns, digest)
    return states


def edit_demo(workdir: Path, **sections: dict) -> None:
    """Update sections of the demo config as a user edits the file."""
    demo = workdir / DEMO_CONFIG
    config = yaml.safe_load(demo.read_text())
    for section, values in sections.items():
        config[section].update(values)
    demo.write_text(yaml.safe_dump(config, sort_keys=False))


def rerun(workdir: Path, expected_jobs: set[str]) -> tuple[dict, dict]:
    """Check the dry run's jobs, run the demo command; (file states before, after)."""
    assert would_run_jobs(workdir) == expected_jobs
    before = file_states(workdir)
    snakemake(workdir, "--profile", "profiles/demo", "--cores", "2")
    assert would_run_jobs(workdir) == set()  # and then it is done
    return before, file_states(workdir)


IMAGE = re.compile(r"/\d{5}\.(png|txt|json)$")  # a generated image or its caption/metadata


def assert_same_files(before: dict, after: dict, ran: set[str], remade=frozenset()) -> None:
    """The files of the jobs that did not run, and every image not in `remade`, are the same
    files as before (the jobs that ran may rewrite their other outputs, logs and benchmarks)."""

    def may_change(name: str) -> bool:
        if IMAGE.search(name):
            return name in remade
        return job_of(name) in ran or rule_of(name) in ran

    changed = sorted(n for n in before if not may_change(n) and after.get(n) != before[n])
    assert not changed, f"touched, although nothing asked for it: {changed}"


CONFIG_JOBS = {"record_config", "report"}


def test_validation_edit_reruns_only_validation_and_keeps_the_training(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    edit_demo(work, train={"validation_prompts": ["a green triangle", "a red square"],
                           "validation_steps": 3})  # fmt: skip
    ran = {"validate_lora"} | CONFIG_JOBS
    before, after = rerun(work, ran)
    assert_same_files(before, after, ran)
    index = json.loads((work / "results/validation/demo/index.json").read_text())
    assert index["prompts"] == ["a green triangle", "a red square"]
    assert [g["step"] for g in index["grids"]] == [0, 2, 4]


def test_speed_and_logging_edit_touches_no_result(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    edit_demo(work, train={"log_interval": 2, "compile": False, "wandb_run_name": "renamed"},
              generate={"channels_last": True})  # fmt: skip
    before, after = rerun(work, CONFIG_JOBS)
    assert_same_files(before, after, CONFIG_JOBS)


def test_more_images_makes_only_the_new_ones(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    edit_demo(work, generate={"num_images": 10})
    ran = {"generate:2", "assemble", "evaluate_features:2", "evaluate"} | CONFIG_JOBS
    before, after = rerun(work, ran)
    assert_same_files(before, after, ran)
    coco = json.loads((work / "results/dataset/captions.json").read_text())
    assert [im["id"] for im in coco["images"]] == list(range(10))
    made = sorted(p.name for p in (work / "results/generate/shard-2").glob("*.png"))
    assert made == ["00008.png", "00009.png"]
    for name in ("00000.png", "00008.png"):  # the dataset links the shards' files, no copies
        assert (work / "results/dataset" / name).samefile(
            work / "results/generate" / f"shard-{int(name[:5]) // 4}" / name
        )


def test_edited_prompt_regenerates_only_its_images(finished, tmp_path):
    work = clone(finished, tmp_path / "run")
    prompts = work / HOSTILE_CONFIG["generate"]["prompts_file"]
    lines = prompts.read_text().splitlines()
    lines[5] = "a purple hexagon on a white background"  # image 5 only (16 prompts, 8 images)
    prompts.write_text("\n".join(lines) + "\n")
    ran = {"generate:0", "generate:1", "assemble", "report"} | EVAL_01  # the config is the same
    before, after = rerun(work, ran)
    image5 = {f"results/{d}/00005.{ext}" for d in ("generate/shard-1", "dataset")
              for ext in ("png", "txt")}  # fmt: skip
    assert_same_files(before, after, ran, remade=image5)
    assert all(after[name] != before[name] for name in image5)
    assert (work / "results/dataset/00005.txt").read_text() == lines[5]


def _straight_lora(work: Path, out: Path, **changes) -> Path:
    """The run's LoRA trained straight from step 0 by the library, with `changes`."""
    import torch

    from sdxl.train.config import TrainConfig
    from sdxl.train.loop import train

    settings = json.loads((work / "results/train/demo/config.json").read_text())
    settings.update(data_dir=str(work / "results/cache"), output_dir=str(out), resume_from="none",
                    pretrained_model=str(work / "results/weights/model"), **changes)  # fmt: skip
    threads = torch.get_num_threads()
    # As the train_lora job, which snakemake gives min(threads, --cores) = 2 threads: the same
    # float sums (another thread count moves the last bits).
    torch.set_num_threads(2)
    try:
        train(TrainConfig.from_dict(settings))
    finally:
        torch.set_num_threads(threads)
    return out / "lora_final.safetensors"


def _same_lora(a: Path, b: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    want, got = load_file(a), load_file(b)
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()


AFTER_TRAIN_JOBS = {"train_lora", "validate_lora", "generate:0", "generate:1", "assemble"} | EVAL_01


def all_images(states: dict) -> set[str]:
    """A new LoRA: every image is made again."""
    return {name for name in states if IMAGE.search(name)}


def test_longer_then_shorter_training_continues_and_equals_straight_runs(finished, tmp_path):
    """max_steps 4 -> 6 continues from the final checkpoint; 6 -> 2 reuses the checkpoint at
    step 2. Both LoRAs equal straight runs; snapshots and grids of kept steps stay untouched."""
    from safetensors.torch import load_file

    work = clone(finished, tmp_path / "run")
    run = work / "results/train/demo"
    edit_demo(work, train={"max_steps": 6})
    before, after = rerun(work, AFTER_TRAIN_JOBS | CONFIG_JOBS)
    log = (work / "results/logs/train_lora/demo.log").read_text()
    assert "resuming from step 4 (checkpoint results/train/demo/checkpoint_final.pt)" in log
    kept = {f"results/train/demo/demo-step0000000{k}.safetensors" for k in (2, 4)}
    kept |= {f"results/validation/demo/step-000000{k}.png" for k in (2, 4)}
    assert all(after[name] == before[name] for name in kept)  # not redrawn, not rewritten
    assert_same_files(before, after, AFTER_TRAIN_JOBS | CONFIG_JOBS, remade=all_images(before))
    with (run / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    index = json.loads((work / "results/validation/demo/index.json").read_text())
    assert [g["step"] for g in index["grids"]] == [0, 2, 4, 6]  # 0: the base model
    _same_lora(_straight_lora(work, tmp_path / "straight"), run / "lora_final.safetensors")

    edit_demo(work, train={"max_steps": 2})
    before, after = rerun(work, AFTER_TRAIN_JOBS | CONFIG_JOBS)
    log = (work / "results/logs/train_lora/demo.log").read_text()
    checkpoint = "results/train/demo/checkpoints/checkpoint-step0000002.pt"
    assert f"resuming from step 2 (checkpoint {checkpoint})" in log
    assert sorted(p.name for p in run.glob("demo-step*")) == ["demo-step00000002.safetensors"]
    snapshot = "results/train/demo/demo-step00000002.safetensors"
    assert after[snapshot] == before[snapshot]
    assert_same_files(before, after, AFTER_TRAIN_JOBS | CONFIG_JOBS, remade=all_images(before))
    # A straight 2-step run's LoRA is what the first run saved at step 2.
    want, got = load_file(finished / snapshot), load_file(run / "lora_final.safetensors")
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
