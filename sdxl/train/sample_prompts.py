"""Sample prompts in kohya's format: `a prompt --n negative --w W --h H --d seed --s steps --l cfg`.

One parser for --sample_prompts / --validation_caption_file lines and config.yaml's
train.validation_prompts. Options a line leaves out take the run's values (image_size, seed + the
prompt's index, validation_steps, validation_guidance_scale, no negative prompt). Pure: the
workflow's config check imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl.errors import UserError

# kohya's option letter -> (our field, how its value is read)
OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "s": ("steps", int), "l": ("guidance", float)}  # fmt: skip


@dataclass(frozen=True)
class SamplePrompt:
    """One cell of a sample grid: what to draw and how."""

    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float


def parse_prompt_line(line: str, defaults: dict, where: str) -> SamplePrompt:
    """One kohya line with `defaults` (SamplePrompt's fields but prompt) for what it leaves out.

    `where` names the line in errors (`file:line`, or the config key).
    """
    prompt, *options = f" {line.strip()}".split(" --")  # a leading --w is an option too
    values = dict(defaults)
    for option in options:
        name, _, text = option.strip().partition(" ")
        if name.lower() not in OPTIONS:
            raise UserError(f"{where}: unknown option --{name}; a sample prompt takes --n "
                            "negative, --w width, --h height, --d seed, --s steps, --l cfg")  # fmt: skip
        key, kind = OPTIONS[name.lower()]
        try:
            values[key] = kind(text.strip())
        except ValueError:
            raise UserError(
                f"{where}: --{name} needs {'an integer' if kind is int else 'a number'}, got {text.strip()!r}"
            ) from None
    sample = SamplePrompt(prompt=prompt.strip(), **values)
    _check(sample, where)
    return sample


def _check(sample: SamplePrompt, where: str) -> None:
    if not sample.prompt:
        raise UserError(f"{where}: the line has options but no prompt; write the prompt first")
    for key in ("width", "height"):
        value = getattr(sample, key)
        if value < 8 or value % 8:
            raise UserError(f"{where}: {key} {value} must be a positive multiple of 8 (the VAE's "
                            "factor); pass e.g. --w 1024 --h 768")  # fmt: skip
    if sample.steps < 1:
        raise UserError(f"{where}: --s {sample.steps}: sampling steps must be at least 1")
    if sample.guidance < 0:
        raise UserError(f"{where}: --l {sample.guidance}: the guidance scale must be at least 0")


def sample_prompts(lines, size: int, seed: int, steps: int, guidance: float,
                   source: str = "validation_prompts") -> list[SamplePrompt]:  # fmt: skip
    """Each line parsed with the run's defaults; prompt i's seed is seed + i unless --d says.

    `source` names the lines in errors: line i is `source[i]`.
    """
    out = []
    for i, line in enumerate(lines):
        defaults = {"negative": "", "width": size, "height": size, "seed": seed + i,
                    "steps": steps, "guidance": guidance}  # fmt: skip
        out.append(parse_prompt_line(line, defaults, f"{source}[{i}]"))
    return out


def read_prompt_lines(path: str | Path, flag: str) -> list[str]:
    """The prompt lines of a file (empty lines and # comments skipped), each checked.

    Errors name `path:line` and `flag` (the option or config key the path came from).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} {path}: not valid UTF-8 ({err}); re-save it as UTF-8") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            check_line(line, f"{path}:{number}")
            lines.append(line.strip())
    if not lines:
        raise UserError(f"{flag} {path}: no prompts in the file; write one prompt per line")
    return lines


def check_line(line: str, where: str) -> None:
    """UserError naming `where` if the line's options are bad (before the run's values are known)."""
    parse_prompt_line(line, _ANY, where)


# Defaults that pass the checks, for checking a line on its own.
_ANY = {"negative": "", "width": 64, "height": 64, "seed": 0, "steps": 1, "guidance": 1.0}
