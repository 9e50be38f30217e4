"""The workflow report's pieces: training, validation, dataset, generation, runtime, config.

Snakemake's report shows SVG, PNG and HTML inline, so every piece is one of those, drawn here
without a plotting library (SVG by hand, PNGs with PIL). Pages are self-contained, run no
JavaScript and escape every string that comes from data or config.

`build_report` writes them all; `readers` turns the stages' files into values, `charts`
draws SVG, `images` composes PNGs and `pages` writes HTML.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from sdxl.report import readers
from sdxl.report.charts import loss_curve_svg, nice_ticks, smooth
from sdxl.report.images import thumbnail_uri, validation_over_time
from sdxl.report.pages import (
    config_page,
    data_page,
    generation_page,
    runtime_page,
    training_page,
)
from sdxl.report.readers import read_loss
from sdxl.utils import atomic_path, atomic_write_text

__all__ = ["ReportInputs", "ReportOutputs", "build_report", "clip_token_counter", "config_page",
           "loss_curve_svg", "nice_ticks", "read_loss", "smooth", "write_config_snapshot",
           "write_loss_curve"]  # fmt: skip

SAMPLE_IMAGES = 16  # thumbnails on the generation page

PathLike = str | os.PathLike


def _as_paths(value) -> tuple[Path, ...]:
    """A path or a list of paths (Snakemake gives a one-file list as either) as a tuple."""
    return (Path(value),) if isinstance(value, str | os.PathLike) else tuple(map(Path, value))


@dataclass(frozen=True)
class ReportInputs:
    """The files the report is drawn from; names as in the report rule's `input:`."""

    lora: Path  # results/train/<run>/lora_final.safetensors; metrics.csv, config.json beside it
    validation: Path  # results/validation/<run>/index.json; the grid PNGs beside it
    config: Path  # the whole workflow config (record_config's snapshot)
    manifest: Path  # kept training items
    problems: Path  # problems.tsv
    problems_html: Path
    latents: Path  # latent cache index.json; its shard-NNNNN.json beside it
    model: Path  # diffusers model folder (for the CLIP tokenizer)
    shards: tuple[Path, ...]  # generate shard-K.json markers
    metadata: Path  # results/dataset/metadata.jsonl; the images beside it
    sheet: Path  # contact sheet PNG
    benchmarks: tuple[Path, ...]  # Snakemake benchmark TSVs (missing ones are noted)

    @classmethod
    def of(cls, named) -> ReportInputs:
        """From anything with these attributes, such as a script's `snakemake.input`."""
        lists = {"shards", "benchmarks"}
        return cls(**{f.name: _as_paths(getattr(named, f.name)) if f.name in lists
                      else Path(getattr(named, f.name)) for f in fields(cls)})  # fmt: skip


@dataclass(frozen=True)
class ReportOutputs:
    """The report items written; names as in the report rule's `output:`."""

    training: Path
    loss: Path
    validation: Path
    data: Path
    problems: Path
    generation: Path
    sheet: Path
    runtime: Path
    config: Path

    @classmethod
    def of(cls, named) -> ReportOutputs:
        """From anything with these attributes, such as a script's `snakemake.output`."""
        return cls(**{f.name: Path(getattr(named, f.name)) for f in fields(cls)})


def write_loss_curve(
    metrics_csv: PathLike, out_svg: PathLike, title: str = "training loss"
) -> Path:
    """Draw metrics.csv's loss as an SVG file (a placeholder when nothing was logged)."""
    steps, losses = read_loss(metrics_csv)
    atomic_write_text(out_svg, loss_curve_svg(steps, losses, title))
    return Path(out_svg)


def write_config_snapshot(config: dict, out_json: PathLike) -> Path:
    """The run's whole configuration as JSON: what the config page shows, and a record."""
    atomic_write_text(out_json, json.dumps(config, indent=1, default=str) + "\n")
    return Path(out_json)


def clip_token_counter(model_dir: PathLike) -> Callable[[str], int] | None:
    """Caption -> CLIP-L token count (start and end included), None without a tokenizer."""
    from sdxl.text import load_tokenizers

    try:
        tokenizer = load_tokenizers(model_dir)[0]
    except FileNotFoundError:
        return None
    return lambda caption: len(tokenizer(caption)["input_ids"])


def write_training(lora: PathLike, workflow_config: dict, out_html: PathLike) -> None:
    """The training page from the LoRA file and the run folder beside it."""
    run_dir = Path(lora).parent
    summary = readers.read_lora(lora) if Path(lora).is_file() else None
    train = readers.read_json(run_dir / "config.json") or {}
    series = readers.read_metrics(run_dir / "metrics.csv")
    skipped = readers.skipped_updates(run_dir / "metrics.csv")
    run = str(workflow_config.get("run", ""))
    atomic_write_text(out_html, training_page(summary, train, series, skipped, run))


def write_validation(index_json: PathLike, out_png: PathLike) -> None:
    """Validation over time as one PNG (a note on how to turn it on when it was off)."""
    index = readers.read_json(index_json) or {}
    with atomic_path(out_png) as tmp:
        validation_over_time(index, Path(index_json).parent).save(tmp, format="PNG")


def write_data(
    inputs: ReportInputs, out_html: PathLike, token_count: Callable[[str], int] | None
) -> None:
    """The dataset page; `token_count` None leaves the caption histogram out with a note."""
    from sdxl.data.dataset import read_manifest

    items = read_manifest(inputs.manifest)
    tokens = [token_count(item.caption) for item in items] if token_count else None
    problems = readers.read_problems(inputs.problems)
    buckets = readers.bucket_counts(inputs.latents)
    atomic_write_text(out_html, data_page(len(items), problems, buckets, tokens))


def write_generation(
    metadata: PathLike, shards: Sequence[PathLike], workflow_config: dict, out_html: PathLike
) -> None:
    """The generated-dataset page: settings, shards and evenly spaced sample thumbnails."""
    records = readers.read_jsonl(metadata)
    folder = Path(metadata).parent
    picked = [records[k] for k in readers.spread(len(records), SAMPLE_IMAGES)]
    samples = [(r, thumbnail_uri(folder / str(r.get("file_name", "")))) for r in picked]
    markers = readers.read_shard_markers(shards)
    settings = workflow_config.get("generate") or {}
    atomic_write_text(out_html, generation_page(records, markers, settings, samples))


def write_runtime(benchmarks: Sequence[PathLike], out_html: PathLike) -> None:
    atomic_write_text(out_html, runtime_page(readers.read_benchmarks(benchmarks)))


def _copy(src: PathLike, dst: PathLike) -> None:
    """Pages other rules made, copied so that every report item is the report rule's output
    (Snakemake embeds the producing job's params in the report)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def build_report(
    inputs: ReportInputs,
    outputs: ReportOutputs,
    *,
    token_count: Callable[[str], int] | None = None,
) -> None:
    """Every report item the report rule writes.

    `token_count` (caption -> CLIP tokens) defaults to the model folder's CLIP-L tokenizer.
    """
    config = json.loads(inputs.config.read_text(encoding="utf-8"))
    write_training(inputs.lora, config, outputs.training)
    write_loss_curve(inputs.lora.parent / "metrics.csv", outputs.loss)
    write_validation(inputs.validation, outputs.validation)
    write_data(inputs, outputs.data, token_count or clip_token_counter(inputs.model))
    _copy(inputs.problems_html, outputs.problems)
    write_generation(inputs.metadata, inputs.shards, config, outputs.generation)
    _copy(inputs.sheet, outputs.sheet)
    write_runtime(inputs.benchmarks, outputs.runtime)
    atomic_write_text(outputs.config, config_page(config))
