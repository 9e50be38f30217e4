"""presets/*.yaml: config overlays that are valid on config.yaml, alone and stacked, and say why.

Each preset is merged onto config.yaml with snakemake's own merge (`update_config`, what
`--configfile config.yaml presets/x.yaml` does), then checked as the Snakefile checks a config:
sdxl.workflow_config.check_config, snakemake.utils.validate (fills the defaults), check_settings,
and the TrainConfig the train job builds. A new preset file is picked up by the glob.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate

from sdxl.train.config import VALIDATION_SETTINGS, TrainConfig
from sdxl.workflow_config import check_config, check_settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
NAMES = [p.stem for p in PRESETS]
MEMORY = ["12gb", "24gb", "80gb"]  # one card each; 4gpu goes after one of them
GLOBAL_BATCH = 4  # images per optimizer step in every memory/GPU preset (their header says why)
# What the dry run needs of the checkout (a user's clone, without results/).
WORKFLOW = ["Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
            "profiles", "report", "sdxl", "examples", "presets"]  # fmt: skip


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def merged(*names: str) -> dict:
    """config.yaml with the presets layered on in order, as snakemake merges --configfile files."""
    config = load(ROOT / "config.yaml")
    for name in names:
        update_config(config, load(ROOT / "presets" / f"{name}.yaml"))
    return config


def checked(config: dict) -> dict:
    """The config after the Snakefile's checks (rules/common.smk), defaults filled in."""
    config = copy.deepcopy(config)
    check_config(config, SCHEMA)
    validate(config, str(SCHEMA))
    check_settings(config)
    return config


@functools.cache
def _final(stack: tuple[str, ...]) -> dict:
    return checked(merged(*stack))


def final(*stack: str) -> dict:
    """checked(merged(*stack)), each stack checked once (the schema is parsed on every check)."""
    return copy.deepcopy(_final(stack))


def train_config(config: dict) -> TrainConfig:
    """The TrainConfig of the train job (its dataclass checks what the schema cannot), built from
    the keys workflow_scripts/train_lora.py passes: all but gpus and the validation settings."""
    skip = {"gpus", *VALIDATION_SETTINGS}
    train = {k: v for k, v in config["train"].items() if k not in skip}
    image_size = config["cache"]["latents"]["image_size"]
    return TrainConfig.from_dict({**train, "image_size": image_size, "data_dir": "cache"})


def leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{(section, ..., key): value} of every non-mapping value in a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def test_there_are_the_presets_the_readme_promises():
    assert {"12gb", "24gb", "80gb", "4gpu", "character", "style"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_is_valid_on_config_yaml_and_changes_only_its_keys(name):
    preset, base = (
        leaves(load(ROOT / "presets" / f"{name}.yaml")),
        leaves(load(ROOT / "config.yaml")),
    )
    config = final(name)
    train_config(config)
    got = leaves(config)
    for key, value in preset.items():
        assert got[key] == value, f"presets/{name}.yaml: {'.'.join(key)} did not take effect"
    for key, value in base.items():  # sections are merged, not replaced
        if key not in preset:
            assert got[key] == value, f"presets/{name}.yaml lost config.yaml's {'.'.join(key)}"


@pytest.mark.parametrize(
    "stack",
    [*itertools.product(MEMORY, ["character", "style"]), ("12gb", "4gpu", "character"),
     ("24gb", "4gpu"), ("80gb", "4gpu", "style")],
    ids="+".join,
)  # fmt: skip
def test_stacked_presets_are_valid(stack):
    train_config(final(*stack))


@pytest.mark.parametrize(
    "stack", [["12gb"], ["24gb"], ["80gb"], ["4gpu"], ["12gb", "4gpu"], ["24gb", "4gpu"]]
)
def test_memory_and_gpu_presets_train_the_same_global_batch(stack):
    """So character.yaml's and style.yaml's step counts mean the same on every card."""
    train = final(*stack)["train"]
    assert (
        train["batch_size"] * train["gradient_accumulation_steps"] * train["gpus"] == GLOBAL_BATCH
    )


def test_4gpu_spreads_every_stage_over_four_gpus():
    config = final("24gb", "4gpu")
    assert config["train"]["gpus"] == 4 and config["cache"]["latents"]["shards"] == 4
    assert config["train"]["gradient_checkpointing"] is False  # the memory preset's, kept


def test_memory_presets_set_what_their_card_needs():
    small, big = final("12gb")["train"], final("80gb")["train"]
    assert small["gradient_checkpointing"] and small["optimizer"] == "adamw8bit"
    assert not big["gradient_checkpointing"] and big["batch_size"] > small["batch_size"]


@pytest.mark.parametrize("name", ["character", "style"])
def test_length_settings_end_training_where_the_preset_says(name):
    train = final("24gb", name)["train"]
    if train["max_steps"] is None:  # the length is in epochs
        assert train["num_epochs"] >= 1
        return
    # max_steps ends training on any dataset (each epoch has at least one step) ...
    assert train["num_epochs"] >= train["max_steps"]
    # ... without a checkpoint after each of those short epochs, yet resumable.
    assert train["save_interval"] >= train["num_epochs"] and train["checkpoint_steps"] > 0


def test_character_and_style_differ_in_what_they_learn():
    character, style = final("character")["train"], final("style")["train"]
    learned = ("lora_alpha", "lora_target_mode", "max_steps", "min_snr_gamma")
    assert all(character[k] != style[k] for k in learned)


@pytest.mark.parametrize("name", NAMES)
def test_preset_starts_with_its_documentation(name):
    text = (ROOT / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    header = list(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
    assert len(header) >= 10 and header[0].startswith("# Preset: "), "no comment block on top"
    block = "\n".join(header)
    usage = rf"--configfile config\.yaml( presets/\S+\.yaml)* presets/{name}\.yaml"
    assert re.search(usage, block), "no usage line"
    assert "Sources:" in block and re.search(r"https://\S+", block), "no source cited"
    assert "later files win" in block and "replaced whole" in block, "merge rule not stated"


def test_readme_lists_every_preset():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Presets") :]
    section = section[: section.index("\n#", 1)]
    assert "--configfile config.yaml presets/" in section
    for name in NAMES:
        assert f"presets/{name}.yaml" in section, f"README's Presets section lacks {name}"


def test_dry_run_merges_the_files_like_the_tests_do(tmp_path):
    """The real command: an overlay after 4gpu.yaml that names only generate.num_images keeps
    4gpu's images_per_shard (sections merge), so 1000 images are 4 generate jobs, not 1."""
    for name in WORKFLOW:
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "more.yaml").write_text("generate:\n  num_images: 1000\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-n", "--resources", "gpu=4",
           "--configfile", "config.yaml", "presets/4gpu.yaml", "more.yaml"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env={**env, "SDXL_GPUS": ""}, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.MULTILINE))
    assert jobs["generate"] == "4" and jobs["cache_latents"] == "4" and jobs["train_lora"] == "1"
