"""Pieces of the workflow report: the loss curve (SVG, no plotting library), the run's config.

Snakemake's report shows SVG, PNG and HTML inline, so every piece here is one of those.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdxl.utils import atomic_write_text

WIDTH, HEIGHT = 720, 360
MARGIN = {"left": 64, "right": 16, "top": 32, "bottom": 44}


def read_loss(metrics_csv: str | os.PathLike) -> tuple[list[int], list[float]]:
    """(steps, losses) from a training metrics.csv; rows without a finite loss are skipped."""
    steps, losses = [], []
    path = Path(metrics_csv)
    if not path.is_file():
        return steps, losses
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, loss = int(row["step"]), float(row["loss"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(loss):
                steps.append(step)
                losses.append(loss)
    return steps, losses


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _polyline(xs, ys, sx, sy, style: str) -> str:
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    return f'<polyline fill="none" {style} points="{points}"/>'


def _axes(x_ticks, y_ticks, sx, sy) -> list[str]:
    """Grid lines and tick labels."""
    left, bottom = MARGIN["left"], HEIGHT - MARGIN["bottom"]
    right, top = WIDTH - MARGIN["right"], MARGIN["top"]
    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
             'fill="white" stroke="#888"/>']  # fmt: skip
    for t in y_ticks:
        y = sy(t)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    for t in x_ticks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{t:g}</text>')
    return parts


def loss_curve_svg(
    steps: Sequence[int], losses: Sequence[float], title: str = "training loss"
) -> str:
    """An SVG line chart of the loss (light) and its smoothed curve (dark) against the step."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">')  # fmt: skip
    label = f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>'
    if not steps:
        note = (
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no loss logged yet</text>'
        )
        return "\n".join([head, label, note, "</svg>\n"])
    lo, hi = min(losses), max(losses)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 0.05
    x_lo, x_hi = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    sx = _scale(x_lo, x_hi, MARGIN["left"], WIDTH - MARGIN["right"])
    sy = _scale(lo - pad, hi + pad, HEIGHT - MARGIN["bottom"], MARGIN["top"])
    y_ticks = [t for t in nice_ticks(lo - pad, hi + pad) if lo - pad <= t <= hi + pad]
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
    parts = [head, label, *_axes(x_ticks, y_ticks, sx, sy)]
    parts.append(_polyline(steps, losses, sx, sy, 'stroke="#9ecae1" stroke-width="1"'))
    parts.append(_polyline(steps, smooth(losses), sx, sy, 'stroke="#08519c" stroke-width="2"'))
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">optimizer step</text>'
    )
    return "\n".join([*parts, "</svg>\n"])


def write_loss_curve(
    metrics_csv: str | os.PathLike, out_svg: str | os.PathLike, title: str = "training loss"
) -> Path:
    """Draw metrics.csv's loss as an SVG file (a placeholder when nothing was logged)."""
    steps, losses = read_loss(metrics_csv)
    atomic_write_text(out_svg, loss_curve_svg(steps, losses, title))
    return Path(out_svg)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} pre{{background:#f6f6f6;padding:8px}}</style>
</head><body><h2>{title}</h2>
{body}
</body></html>
"""


def config_page(config: dict, title: str = "Run configuration") -> str:
    """The configuration as an HTML page: one section per top-level key, JSON-formatted."""
    sections = []
    for key, value in config.items():
        text = json.dumps(value, indent=2, sort_keys=False, default=str)
        sections.append(f"<h3>{html.escape(str(key))}</h3>\n<pre>{html.escape(text)}</pre>")
    return _PAGE.format(title=html.escape(title), body="\n".join(sections))


def write_config_page(config: dict, out_html: str | os.PathLike) -> Path:
    """Write config_page(config) atomically."""
    atomic_write_text(out_html, config_page(config))
    return Path(out_html)


def write_config_snapshot(config: dict, out_json: str | os.PathLike) -> Path:
    """The run's whole configuration as JSON: what the config page shows, and a record."""
    atomic_write_text(out_json, json.dumps(config, indent=1, default=str) + "\n")
    return Path(out_json)


def collect_images(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, pattern: str = "*.png"
) -> list[Path]:
    """Copy the images matching `pattern` from src_dir (if it exists) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(Path(src_dir).glob(pattern)) if Path(src_dir).is_dir() else []:
        shutil.copyfile(path, out_dir / path.name)
        copied.append(out_dir / path.name)
    return copied


def build_report(
    metrics_csv: str | os.PathLike,
    samples_dir: str | os.PathLike,
    config_json: str | os.PathLike,
    *,
    loss_svg: str | os.PathLike,
    config_html: str | os.PathLike,
    validation_dir: str | os.PathLike,
    copies: Mapping[str | os.PathLike, str | os.PathLike] | None = None,
) -> None:
    """Everything the report rule writes: loss curve, config page, validation grids.

    `copies` (source -> destination): pages other rules made, copied so that every report
    item is this rule's output (Snakemake embeds the producing job's params in the report).
    """
    write_loss_curve(metrics_csv, loss_svg)
    write_config_page(json.loads(Path(config_json).read_text()), config_html)
    collect_images(samples_dir, validation_dir)
    for src, dst in (copies or {}).items():
        shutil.copyfile(src, dst)
