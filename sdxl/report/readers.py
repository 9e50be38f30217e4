"""Read what the pipeline's stages wrote into plain values for the report pages.

The report runs last and describes whatever is there: a missing or half-written optional file
gives an empty value (the page then says so), never a failed report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sdxl.data.dataset import PROBLEM_COLUMNS
from sdxl.utils import sha256_file

METRIC_COLUMNS = ("loss", "lr", "grad_norm", "images_per_s", "peak_mem_gb")
# The order the workflow's rules run in; the runtime table follows it.
PIPELINE_ORDER = ("weights", "validate_captions", "cache_latents", "merge_latents", "cache_text",
                  "train_lora", "validate_lora", "generate", "assemble", "record_config")  # fmt: skip


def _number(text) -> float | None:
    """A finite float, or None for '', 'NA', '-', nan and anything else unreadable."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON file's object, or None when the file is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON Lines file (blank lines skipped); [] when it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------
# Training


def read_metrics(metrics_csv: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Per metrics.csv column, (steps, values) of the rows where it holds a finite number."""
    series: dict[str, tuple[list[int], list[float]]] = {c: ([], []) for c in METRIC_COLUMNS}
    path = Path(metrics_csv)
    if not path.is_file():
        return series
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            for column, (steps, values) in series.items():
                value = _number(row.get(column))
                if step is not None and value is not None:
                    steps.append(int(step))
                    values.append(value)
    return series


def read_loss(metrics_csv: str | os.PathLike) -> tuple[list[int], list[float]]:
    """(steps, losses) from a training metrics.csv; rows without a finite loss are skipped."""
    return read_metrics(metrics_csv)["loss"]


def skipped_updates(metrics_csv: str | os.PathLike) -> int:
    """Optimizer updates the trainer skipped for non-finite gradients (the `skipped` column)."""
    path = Path(metrics_csv)
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        return int(sum(_number(row.get("skipped")) or 0 for row in csv.DictReader(f)))


@dataclass(frozen=True)
class LoraSummary:
    """What a kohya-format LoRA file holds, read from its safetensors header only."""

    file_name: str
    size_bytes: int
    sha256: str
    metadata: dict[str, str]  # kohya's ss_* training fields, modelspec.*, ...
    modules: int  # layers with an adapter (one lora_down each)
    parameters: int  # trainable numbers: every tensor except the `.alpha` scalars
    rank: int | None  # from the first lora_down's shape (ss_network_dim may be absent)


def read_lora(path: str | os.PathLike) -> LoraSummary:
    """Summarise a LoRA file without loading its tensors (only the header is read)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    downs = sorted(k for k in shapes if k.endswith(".lora_down.weight"))
    parameters = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(".alpha"))
    return LoraSummary(
        file_name=path.name,
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
        metadata=metadata,
        modules=len(downs),
        parameters=parameters,
        rank=shapes[downs[0]][0] if downs else None,
    )


# ---------------------------------------------------------------------------------------------
# Dataset


def read_problems(problems_tsv: str | os.PathLike) -> list[dict]:
    """The rows of problems.tsv (write_problems' format) with `dropped` as a bool."""
    path = Path(problems_tsv)
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return []
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8")
    rows = frame.reindex(columns=list(PROBLEM_COLUMNS), fill_value="").to_dict("records")
    return [{**row, "dropped": row["dropped"].strip().lower() == "true"} for row in rows]


def problem_counts(problems: Sequence[dict]) -> tuple[Counter, Counter, int]:
    """(dropped files per kind, warnings per kind, distinct dropped files)."""
    dropped = Counter(p["kind"] for p in problems if p["dropped"])
    warnings = Counter(p["kind"] for p in problems if not p["dropped"])
    return dropped, warnings, len({p["file"] for p in problems if p["dropped"]})


def _latent_shard_paths(index_path: Path, index: dict) -> list[Path]:
    names = index.get("shards")
    if isinstance(names, list):
        return [index_path.parent / f"{name}.json" for name in names]
    return sorted(index_path.parent.glob("shard-*.json"))


def bucket_counts(latent_index: str | os.PathLike) -> dict[tuple[int, int], int]:
    """Training items per bucket (w, h), from the latent cache's shard records.

    Mirrored samples (`flipped`) are the same items again, so only unflipped ones count.
    """
    index_path = Path(latent_index)
    index = read_json(index_path) or {}
    counts: Counter = Counter()
    for shard in _latent_shard_paths(index_path, index):
        for record in (read_json(shard) or {}).get("items", []):
            if not record.get("flipped"):
                counts[tuple(int(v) for v in record["bucket"])] += 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])))


def token_bins(counts: Sequence[int], limit: int, bins: int = 24) -> tuple[list[float], list[int]]:
    """(edges, counts) of a histogram of integer token counts, one edge at limit + 0.5.

    Bins hold whole numbers of tokens, so the limit line falls between two bars: everything
    right of it is cut off by CLIP.
    """
    if not counts:
        return [], []
    lo, hi = min(counts), max(max(counts), limit + 1)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    start = limit + 1 - width * math.ceil((limit + 1 - lo) / width)  # a bin starts at limit+1
    n = math.ceil((hi + 1 - start) / width)
    histogram = Counter((c - start) // width for c in counts)
    edges = [start - 0.5 + k * width for k in range(n + 1)]
    return edges, [histogram.get(k, 0) for k in range(n)]


# ---------------------------------------------------------------------------------------------
# Generation and runtime


def read_shard_markers(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The generate jobs' shard-K.json markers, by shard number (unreadable ones left out)."""
    markers = [m for m in (read_json(p) for p in paths) if m is not None]
    return sorted(markers, key=lambda m: _number(m.get("shard")) or 0)


def spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices evenly spread over 0..count-1 (first and last included), or all."""
    if count <= wanted:
        return list(range(count))
    if wanted == 1:
        return [0]
    return sorted({round(k * (count - 1) / (wanted - 1)) for k in range(wanted)})


@dataclass(frozen=True)
class BenchmarkRow:
    """One job's line in the runtime table; seconds None: the job recorded no benchmark."""

    rule: str
    wildcard: str
    seconds: float | None = None
    max_rss_mb: float | None = None
    path: str = field(default="", compare=False)


def _job_of(path: Path) -> tuple[str, str]:
    """(rule, wildcard) from results/benchmarks/<rule>.tsv or .../<rule>/<wildcard>.tsv."""
    parts = path.with_suffix("").parts
    below = [i for i, part in enumerate(parts) if part == "benchmarks"]
    rel = parts[below[-1] + 1 :] if below and below[-1] + 1 < len(parts) else parts[-1:]
    return rel[0], "/".join(rel[1:])


def read_benchmark(path: str | os.PathLike) -> BenchmarkRow:
    """A Snakemake benchmark TSV: mean seconds and the largest max_rss over its runs."""
    path = Path(path)
    rule, wildcard = _job_of(path)
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
    except OSError:
        rows = []
    seconds = [s for s in (_number(r.get("s")) for r in rows) if s is not None]
    rss = [m for m in (_number(r.get("max_rss")) for r in rows) if m is not None]
    return BenchmarkRow(rule, wildcard, sum(seconds) / len(seconds) if seconds else None,
                        max(rss) if rss else None, str(path))  # fmt: skip


def _natural(text: str) -> list:
    """Sort key that puts shard-2 before shard-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def read_benchmarks(paths: Sequence[str | os.PathLike]) -> list[BenchmarkRow]:
    """Every job's benchmark, in pipeline order (unknown rules last, by name)."""
    rows = [read_benchmark(p) for p in paths]
    order = {rule: k for k, rule in enumerate(PIPELINE_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r.rule, len(order)), r.rule, _natural(r.wildcard)))
