"""Config checks of the Snakemake workflow that end in one line naming the file, line or key.

Snakemake's own messages lack exactly that: a broken config.yaml gives "Config file is not
valid JSON or YAML" (no file, no line) and an unknown key dumps the whole section and the
schema (~180 lines). The Snakefile calls these before snakemake's own loading and
validation, so those only ever see a config that passes. Imports only yaml and jsonschema
(snakemake's own dependencies): the workflow is parsed by snakemake's Python, maybe without
torch.
"""

from __future__ import annotations

import os

import yaml

from sdxl.config_fields import did_you_mean
from sdxl.errors import UserError


class ConfigError(UserError):
    """A config file or value the workflow cannot use."""


def check_yaml_file(path: str | os.PathLike) -> dict:
    """Parse a YAML config file; ConfigError naming `path:line:column` if it is not valid.

    A missing file gives {}: whether it must exist is for snakemake's `configfile:` to say.
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as err:
        mark, start = err.problem_mark or err.context_mark, err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(p for p in (err.context, err.problem) if p)
        if start is not None and mark is not None and start.line != mark.line:
            problem += f", opened at line {start.line + 1}"  # e.g. a [ never closed
        raise ConfigError(
            f"{where}: not valid YAML ({problem}); indent with spaces, not tabs, and quote "
            "values that hold ': ', '#' or start with a special character"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys (`run: ...`, `train: ...`)")
    return data or {}


# Keys of earlier versions, and what replaced them.
RENAMED = {
    "generate.shards": "generate.images_per_shard replaced it (each generate job makes a fixed "
    "range of that many images, so raising num_images only makes the new ones)",
}


def check_config(config: dict, schema_path: str | os.PathLike) -> None:
    """ConfigError naming the first key that is unknown or has a bad value, in one line."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    with open(schema_path, encoding="utf-8") as f:
        schema = yaml.safe_load(f)
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(_describe(error))


def check_settings(config: dict) -> None:
    """ConfigError for settings that contradict each other (after the schema's defaults)."""
    train = config["train"]
    lines = sample_prompt_lines(train)  # (checked: an error names the file's line or the key)
    epochs, saved = train["sample_every_n_epochs"], train["save_every_n_epochs"]
    if lines and epochs and (not saved or epochs % saved):
        raise ConfigError(
            f"config key 'train.sample_every_n_epochs': {epochs} must be a multiple of "
            f"train.save_every_n_epochs ({saved}): the grids are drawn from the LoRA snapshots "
            "saved every save_every_n_epochs epochs"
        )
    steps, interval = train["sample_every_n_steps"], train["validation_interval"]
    if steps and interval and steps != interval:
        raise ConfigError(
            f"config key 'train.sample_every_n_steps': {steps} is kohya's name for "
            f"train.validation_interval ({interval}); set one of them"
        )
    key = "validation_interval" if interval else "sample_every_n_steps"
    every, interval = train["save_every_n_steps"], interval or steps
    if lines and interval and (not every or interval % every):
        raise ConfigError(
            f"config key 'train.{key}': {interval} must be a multiple of "
            f"train.save_every_n_steps ({every}): the grids are drawn from the LoRA snapshots "
            "saved every save_every_n_steps steps"
        )


def sample_prompt_lines(train: dict) -> list[str]:
    """The prompt lines of train.sample_prompts (a file) or else train.validation_prompts, each
    checked (ConfigError naming the file's line or the key)."""
    from sdxl.train.sample_prompts import check_line, read_prompt_lines

    try:
        if train.get("sample_prompts"):
            return read_prompt_lines(train["sample_prompts"], "config key 'train.sample_prompts':")
        for i, line in enumerate(train["validation_prompts"]):
            check_line(line, f"config key 'train.validation_prompts[{i}]'")
    except UserError as err:
        raise ConfigError(str(err)) from None
    return list(train["validation_prompts"])


def _describe(error) -> str:
    """One line for a jsonschema error: the dotted key, what is wrong, the fix if known."""
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        unknown = sorted(set(error.instance) - set(known))
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        if key in RENAMED:
            return f"config key {key!r} is no longer used: {RENAMED[key]}"
        hint = did_you_mean(unknown[0], known) or f"known keys: {', '.join(known)}"
        return f"config key {key!r} is unknown; {hint} (see config.yaml for every key)"
    if error.validator == "pattern" and "description" in error.schema:
        # The regex says little to a reader; the description says what is allowed.
        return f"config key {where!r}: {error.instance!r} is not allowed: {error.schema['description']}"
    return f"config key {where or '(top level)'!r}: {error.message}"
