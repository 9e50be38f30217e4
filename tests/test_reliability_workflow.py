"""The reliability catalogue's Workflow, Security and Weights-stage rows, as cases.

Each case asserts the one clear message a user gets and that nothing already made is lost.
The demo run these cases inspect is the one of tests/test_workflow.py (run once per session,
with hostile strings in every user-controlled field); the rest use dry runs or a tiny
Snakefile whose jobs import no torch. (A stale GPU lock of a killed job is reclaimed:
tests/test_devices.py::test_killed_job_releases_its_device.)
"""

from __future__ import annotations

import base64
import json
import re
import signal
import stat
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from sdxl.procs import is_alive
from tests.test_workflow import (
    BIN,
    HOSTILE,
    ROOT,
    TOKEN,
    _demo_run,
    _env,
    copy_workflow,
)

# The tests of the demo run (this module and its sibling share it) run on one xdist worker.
pytestmark = pytest.mark.xdist_group("demo")

# The hostile markup of add_hostile_inputs (each field has its own alert number).
MARKUP = re.compile(r"<img src=x onerror=alert\(\d\)>")


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    return _demo_run(tmp_path_factory)


def _cli(workdir: Path, *args: str, env: dict | None = None, timeout: int = 300):
    cmd = [str(BIN / "snakemake"), *args]
    return subprocess.run(cmd, cwd=workdir, env={**_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Workflow: config errors, before any job


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"train": {"learning_rate": -1.0}}, "config key 'train.learning_rate': -1.0 is less than"),
        ({"generate": {"images_per_shard": "two"}},
         "config key 'generate.images_per_shard': 'two' is not of type"),
        ({"generate": {"shards": 4}},
         "config key 'generate.shards' is no longer used: generate.images_per_shard replaced it"),
        ({"train": {"validation_prompts": ["a"], "validation_interval": 3,
                    "save_every_n_steps": 2}},
         "config key 'train.validation_interval': 3 must be a multiple of train.save_every_n_steps"),
        ({"train": {"validation_prompts": ["a"], "sample_every_n_epochs": 1}},
         "config key 'train.sample_every_n_epochs': 1 must be a multiple of "
         "train.save_every_n_epochs (0)"),
        ({"train": {"validation_prompts": ["a cat --ss euler_a"]}},
         "config key 'train.validation_prompts[0]': unknown option --ss"),
        ({"train": {"learning_rat": 1e-4}},
         "config key 'train.learning_rat' is unknown; did you mean 'learning_rate'?"),
        ({"run": HOSTILE.format(0)}, "config key 'run': '</script><img src=x onerror=alert(0)>' "
                                     "is not allowed: letters, digits"),
    ],
    ids=["invalid-value", "wrong-type", "renamed-key", "inconsistent", "epoch-samples",
         "kohya-option", "unknown-key", "unsafe-run-name"],
)  # fmt: skip
def test_config_error_is_one_line_naming_the_key_before_any_job(tmp_path, overlay, message):
    work = copy_workflow(tmp_path / "run")
    (work / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    result = _cli(work, "-n", "--configfile", "overlay.yaml")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert message in out
    assert len(out.splitlines()) < 12  # not the schema dump (~180 lines)
    assert "Job stats" not in out and not (work / "results").exists()


def test_broken_yaml_names_the_file_and_line(tmp_path):
    work = copy_workflow(tmp_path / "run")
    config = work / "config.yaml"
    lines = config.read_text().splitlines()
    at = lines.index("  lora_rank: 8")
    lines[at] = "  lora_rank: [8"  # a flow sequence never closed
    config.write_text("\n".join(lines) + "\n")
    result = _cli(work, "-n")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert re.search(rf"config\.yaml:\d+:\d+: not valid YAML .*opened at line {at + 1}\b", out)


# ---------------------------------------------------------------------------------------------
# Workflow: processes (a tiny Snakefile; its jobs start like the real ones, via common.start)

SNAKEFILE = """
rule all:
    input:
        "out.txt",


rule job:
    output:
        "out.txt",
    log:
        "logs/job.log",
    script:
        "job.py"


rule fails:
    output:
        "failed.txt",
    log:
        "logs/fails.log",
    script:
        "fails.py"
"""
# Beats until the file `stop` exists (long enough to be killed, or to be watched while its
# snakemake is alive), then finishes.
JOB = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {scripts!r})
from common import start
start(snakemake)
while not Path("stop").exists():
    Path("heartbeat").write_text(str(os.getpid()))
    time.sleep(0.1)
Path(snakemake.output[0]).write_text("done\\n")
"""
FAILS = """
import sys
sys.path.insert(0, {scripts!r})
from common import start
start(snakemake)
from sdxl.errors import UserError
raise UserError("data/x.png: not an image; delete it or replace it")
"""


@pytest.fixture
def tiny_workflow(tmp_path) -> Path:
    scripts = str(ROOT / "workflow_scripts")
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "job.py").write_text(JOB.format(scripts=scripts))
    (tmp_path / "fails.py").write_text(FAILS.format(scripts=scripts))
    return tmp_path


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    cmd = [str(BIN / "snakemake"), "--cores", "1", *args]
    return subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_second_run_in_one_folder_refuses_and_the_first_completes(tiny_workflow):
    first = _start(tiny_workflow)
    _wait_for((tiny_workflow / "heartbeat").exists, "the first run's job")
    second = _cli(tiny_workflow, "--cores", "1")
    assert second.returncode != 0 and "Directory cannot be locked" in second.stdout + second.stderr
    time.sleep(1.5)  # the job's watcher checks its snakemake every second: it must not stop it
    (tiny_workflow / "stop").touch()
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert (tiny_workflow / "out.txt").read_text() == "done\n"


def test_kill_9_of_snakemake_ends_its_job_and_the_rerun_completes(tiny_workflow):
    run = _start(tiny_workflow)
    _wait_for((tiny_workflow / "heartbeat").exists, "the job")
    job = int((tiny_workflow / "heartbeat").read_text())
    run.send_signal(signal.SIGKILL)
    run.wait()
    _wait_for(lambda: not is_alive(job), "the orphaned job to end", timeout=20)
    assert "is gone; stopping the job" in (tiny_workflow / "logs/job.log").read_text()
    # Snakemake's own lock outlives a kill -9: --unlock once, then the rerun completes.
    assert _cli(tiny_workflow, "--unlock").returncode == 0
    (tiny_workflow / "stop").touch()
    rerun = _cli(tiny_workflow, "--cores", "1", "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (tiny_workflow / "out.txt").read_text() == "done\n"


def test_expected_failure_ends_the_log_with_one_line(tiny_workflow):
    result = _cli(tiny_workflow, "failed.txt", "--cores", "1", "--show-failed-logs")
    assert result.returncode != 0
    log = (tiny_workflow / "logs/fails.log").read_text()
    line = "error: data/x.png: not an image; delete it or replace it"
    assert log.splitlines()[-1] == line and "Traceback" not in log
    assert line in result.stdout + result.stderr  # what the user sees


# ---------------------------------------------------------------------------------------------
# Weights: the Hub cannot be reached from this node


def test_unreachable_hub_fails_the_weights_rule_in_one_line(tmp_path):
    work = copy_workflow(tmp_path / "run")
    overlay = {"weights": {"source": "someone/sdxl", "download_dir": "weights/sdxl"}}
    (work / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN}  # nothing listens on port 9
    result = _cli(work, "results/weights/manifest.json", "--cores", "1", "--configfile",
                  "overlay.yaml", "--workflow-profile", "none", env=env)  # fmt: skip
    assert result.returncode != 0
    last = (work / "results/logs/weights.log").read_text().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hugging Face Hub") and "someone/sdxl" in last
    assert all(way in last for way in ("weights.source", "HF_HUB_OFFLINE=1", "download_weights.sh"))
    assert TOKEN not in result.stdout + result.stderr + last


# ---------------------------------------------------------------------------------------------
# Security: what the finished demo run (hostile strings everywhere) wrote


class _Tags(HTMLParser):
    """Every start tag with its attributes (script and style bodies are text, as in browsers)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def handlers(self) -> set[tuple[str, str]]:
        return {(tag, a) for tag, attrs in self.tags for a in attrs if a.startswith("on")}


def _template_handlers() -> set[tuple[str, str]]:
    """The on* attributes Snakemake's own report template has (none today)."""
    import snakemake.report.html_reporter as reporter

    template = Path(reporter.__file__).parent / "template/index.html.jinja2"
    return _Tags(template.read_text()).handlers()


def _embedded_pages(report: str) -> dict[str, str]:
    """The HTML report items (config and problems pages), decoded from their data URIs."""
    results = re.search(r"var results = (\{.*?\});\n", report, re.DOTALL)
    pages = {}
    for path, item in json.loads(results.group(1)).items():
        if item["mime_type"] == "text/html":
            pages[path] = base64.b64decode(item["data_uri"].split(",", 1)[1]).decode()
    return pages


def test_report_shows_hostile_strings_escaped_and_never_runs_them(finished):
    report = (finished / "results/report.html").read_text()
    tags = _Tags(report)
    assert tags.handlers() <= _template_handlers()
    assert not [attrs for tag, attrs in tags.tags if tag == "img" and "onerror" in attrs]
    assert not MARKUP.search(report)  # not even inside a <script>: nothing unescaped
    pages = _embedded_pages(report)
    names = ("config", "problems", "training", "data", "generation", "evaluation", "runtime")
    assert set(pages) == {f"results/report/{name}.html" for name in names}
    for page in pages.values():
        parsed = _Tags(page)
        assert not parsed.handlers() and "script" not in {tag for tag, _ in parsed.tags}
        images = [attrs for tag, attrs in parsed.tags if tag == "img"]
        assert all(set(a) <= {"src", "alt", "width", "height", "title"} for a in images), images
        assert all(a["src"].startswith("data:image/") for a in images)  # thumbnails only
    generation_text = "".join(_Tags(pages["results/report/generation.html"]).text)
    for n in (2, 5):  # negative prompt, a prompt
        assert f"<img src=x onerror=alert({n})>" in generation_text  # shown, as text
    config_text = "".join(_Tags(pages["results/report/config.html"]).text)
    for n in (1, 2, 3, 4):  # data dir, negative prompt, prompt file, validation prompt
        assert f"<img src=x onerror=alert({n})>" in config_text  # shown, as text
    problems_text = "".join(_Tags(pages["results/report/problems.html"]).text)
    assert "<img src=x onerror=alert(7)>.png" in problems_text  # a file name, as text
    assert "zz_hostile.png" in problems_text  # the long hostile caption's row (caption not shown)


def test_hf_token_is_never_written(finished):
    from PIL import Image

    for path in (p for p in finished.rglob("*") if p.is_file() and not p.is_symlink()):
        assert TOKEN.encode() not in path.read_bytes(), path
        if path.suffix == ".png" and "results" in path.relative_to(finished).parts:
            with Image.open(path) as image:
                assert TOKEN not in json.dumps(image.text), path  # compressed text chunks too


def test_written_files_follow_the_umask(finished):
    """Run under umask 022: every file is 0644, so other accounts (ComfyUI) can read it."""
    modes = {}
    for path in (
        p for p in (finished / "results").rglob("*") if p.is_file() and not p.is_symlink()
    ):
        modes[path.relative_to(finished).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    wrong = {path: oct(mode) for path, mode in modes.items() if mode != 0o644}
    assert any(p.endswith(".safetensors") for p in modes) and not wrong, wrong
