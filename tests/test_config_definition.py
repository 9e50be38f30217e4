"""TrainConfig is the one definition of the training settings: the command line is built from
its fields, the resume and rerun groups come from their metadata, and config.yaml's train
section and its schema are checked against it here. The strict config classes share one
from_dict (sdxl/config_fields.py)."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields
from pathlib import Path
from types import NoneType

import pytest
import yaml

from sdxl.cli.train import build_parser, config_from_args
from sdxl.dataset_config import subsets_from_list
from sdxl.lora import TARGETS
from sdxl.prepare import WeightsConfig
from sdxl.train import config as settings
from sdxl.train.config import OPTIONAL, TYPES, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in fields(TrainConfig)}
# TrainConfig fields that are not config.yaml `train` keys, and why.
NOT_TRAIN_KEYS = {
    # set for each job by workflow_scripts/train_lora.py
    "data_dir", "output_dir", "pretrained_model", "device", "resume_from", "output_name",
    # other sections': cache.latents.image_size, data.subsets; the weights stage's model folder
    "image_size", "subsets", "config_source",
    # the CLI's own caching (the workflow's cache rules have theirs under cache:)
    "vae_model", "center_crop", "min_image_size", "strict_data", "cache_batch_size",
}  # fmt: skip
WORKFLOW_ONLY = {"gpus"}  # the train job's resources, not a TrainConfig setting
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", NoneType: "null"}


def _train_schema() -> dict:
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    return schema["properties"]["train"]["properties"]


def _json_types(kind) -> set[str]:
    if typing.get_origin(kind) is tuple:
        return {"array"}
    return {JSON_TYPES[k] for k in typing.get_args(kind) or (kind,)}


def test_the_groups_partition_the_resume_safe_settings():
    groups = [settings.RUNTIME_SETTINGS, settings.VALIDATION_SETTINGS, settings.LENGTH_SETTINGS,
              settings.SNAPSHOT_SETTINGS]  # fmt: skip
    assert sum(len(g) for g in groups) == len(settings.RESUME_SAFE)
    assert set().union(*groups) == settings.RESUME_SAFE
    assert settings.LENGTH_SETTINGS == ("num_epochs", "max_steps")
    assert {"compile", "device", "output_dir"} <= set(settings.RUNTIME_SETTINGS)
    assert {"lora_rank", "learning_rate", "seed", "image_size"}.isdisjoint(settings.RESUME_SAFE)


def test_the_schema_train_section_agrees_with_the_dataclass():
    schema = _train_schema()
    assert set(schema) - WORKFLOW_ONLY == set(FIELDS) - NOT_TRAIN_KEYS
    for name, entry in schema.items():
        if name in WORKFLOW_ONLY:
            continue
        f, kind = FIELDS[name], TYPES[name]
        choices = set(f.metadata["choices"])
        if "enum" in entry:
            assert set(entry["enum"]) == choices | ({None} if name in OPTIONAL else set()), name
        else:
            assert not choices, f"{name}: the schema should list its choices as an enum"
            declared = entry["type"] if isinstance(entry["type"], list) else [entry["type"]]
            assert set(declared) == _json_types(kind), name
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert entry["default"] == default, name


def test_config_yaml_has_every_train_key_at_its_default():
    train = yaml.safe_load((ROOT / "config.yaml").read_text())["train"]
    schema = _train_schema()
    assert set(train) == set(schema)
    assert train == {k: e["default"] for k, e in schema.items()}


def test_choices_are_the_library_s():
    assert FIELDS["lora_target_mode"].metadata["choices"] == TARGETS
    with pytest.raises(ValueError, match=r"lora_target_mode must be one of .*, got 'every'"):
        TrainConfig(data_dir="d", lora_target_mode="every")
    assert TrainConfig(data_dir="d", prediction_type=None).prediction_type is None
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data_dir="d", precision=None)


def test_every_setting_is_a_flag_unless_it_says_why():
    dests = {a.dest for a in build_parser()._actions}
    not_flags = {n for n, f in FIELDS.items() if f.metadata["flags"] == ()}
    assert not_flags == {"subsets", "cache_batch_size", "validation_prompts"}
    assert dests == (set(FIELDS) - not_flags) | {"help", "debug", "dataset_config", "use_lora"}


def test_the_flags_default_to_the_dataclass_defaults():
    assert config_from_args(build_parser().parse_args(["--data_dir", "d"])) == TrainConfig("d")


def test_the_original_project_s_flag_names_keep_working(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\na blue square --s 3\n")
    argv = ["--data_dir", "d", "--8_bit_adam", "--caption_dropout_rate", "0.1", "--use_lora",
            "--validation_caption_file", str(prompts), "--no-gradient_checkpointing",
            "--no-random_flip", "--compile", "--lora_targets", "a", "b", "--optimizer_args"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.use_8bit_adam and cfg.caption_dropout == 0.1 and cfg.compile is True
    assert not cfg.gradient_checkpointing and not cfg.random_flip
    assert cfg.lora_targets == ("a", "b") and cfg.optimizer_args == ()
    assert cfg.sample_prompts == str(prompts)
    assert cfg.validation_prompts == ("a red circle", "a blue square --s 3")
    kohya = config_from_args(build_parser().parse_args(["--data_dir", "d", "--sample_prompts",
                                                        str(prompts)]))  # fmt: skip
    assert kohya.validation_prompts == cfg.validation_prompts
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data_dir", "d", "--device", "tpu"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainConfig.from_dict({"data_dir": "d", "lora_rnak": 4}),
         "unknown training settings 'lora_rnak'; did you mean 'lora_rank'?"),
        (lambda: TrainConfig.from_dict({}), "data_dir is required"),
        (lambda: WeightsConfig.from_dict({"sorce": "builtin:tiny"}),
         "unknown weights settings 'sorce'; did you mean 'source'?"),
        (lambda: subsets_from_list([{"image_dir": "a", "num_repeat": 2}]),
         "data.subsets[0]: unknown key 'num_repeat'; did you mean 'num_repeats'?"),
        (lambda: subsets_from_list([{"num_repeats": 2}]), "data.subsets[0]: image_dir is required"),
        (lambda: TrainConfig.from_dict({"data_dir": "d", "subsets": [{"image_dir": "a",
                                                                      "flip": True}]}),
         "subsets[0]: unknown key 'flip'; did you mean 'flip_aug'?"),
    ],
)  # fmt: skip
def test_strict_from_dict_names_the_key_and_the_likely_fix(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_from_dict_takes_config_json_back():
    cfg = TrainConfig(data_dir="d", lora_targets=("x",), validation_prompts=("a cat",),
                      subsets=subsets_from_list([{"image_dir": "a", "num_repeats": 2}]))  # fmt: skip
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
