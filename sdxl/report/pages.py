"""The report's HTML pages: self-contained (inline SVG and style, images as data: URIs), no
JavaScript, and every string that comes from data or config escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence

from sdxl.report import charts
from sdxl.report.readers import BenchmarkRow, LoraSummary, problem_counts, token_bins

CLIP_LIMIT = 77  # CLIP's context in tokens, start and end included
NONE = "—"

_STYLE = """body{font-family:sans-serif;margin:16px;max-width:1100px}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold;border-top:2px solid #888}
.note{color:#7a4b00;background:#fff6e0;padding:4px 8px;display:inline-block}
.figures{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:200px}
figcaption{font-size:12px;overflow-wrap:anywhere}"""

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style>
</head><body><h2>{title}</h2>
{body}
</body></html>
"""


def esc(value: object) -> str:
    """Any value as escaped text (quotes too: the result is safe inside attributes)."""
    return html.escape(str(value))


def page(title: str, sections: Iterable[str]) -> str:
    """A whole HTML document; `sections` are HTML already escaped by their makers."""
    return _PAGE.format(title=esc(title), style=_STYLE, body="\n".join(sections))


def note(text: str) -> str:
    """A highlighted line saying what is missing and why, in place of a table or chart."""
    return f'<p class="note">{esc(text)}</p>'


def _cell(value: object) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="num">{esc(value)}</td>' if numeric else f"<td>{esc(value)}</td>"


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], total: Sequence | None = None
) -> str:
    """An HTML table with every cell escaped; numbers right-aligned; an optional total row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = ["<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows]
    if total is not None:
        body.append('<tr class="total">' + "".join(_cell(v) for v in total) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def fields_table(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column table of (name, value)."""
    rows = "\n".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f"<table>\n{rows}\n</table>"


def fmt(value: object, digits: int = 4) -> object:
    """Numbers rounded for reading, None as a dash; everything else as it is."""
    if value is None or value == "":
        return NONE
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def _round(value: float | None, digits: int = 1) -> object:
    return NONE if value is None else round(value, digits)


def fmt_bytes(n: int) -> str:
    """A file size in binary units (the exact byte count is shown beside it)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_hms(seconds: float | None) -> str:
    """Seconds as h:mm:ss, Snakemake's benchmark format, read at a glance for long jobs."""
    if seconds is None:
        return NONE
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Configuration


def config_page(config: dict, title: str = "Run configuration") -> str:
    """The configuration as an HTML page: one section per top-level key, JSON-formatted."""
    sections = []
    for key, value in config.items():
        text = json.dumps(value, indent=2, sort_keys=False, default=str)
        sections.append(f"<h3>{esc(key)}</h3>\n<pre>{esc(text)}</pre>")
    return page(title, sections)


# ---------------------------------------------------------------------------------------------
# Training


def _targets(train: Mapping) -> str:
    """The adapted layers as configured: regexes over module paths, else the target mode."""
    target = train.get("lora_targets") or train.get("lora_target") or train.get("lora_target_mode")
    text = ", ".join(map(str, target)) if isinstance(target, list | tuple) else str(target or NONE)
    return text + (" (+ conv layers)" if train.get("lora_conv") else "")


def lora_fields(lora: LoraSummary, train: Mapping) -> list[tuple[str, object]]:
    """The LoRA summary rows: the file's own header first, the training config as fallback."""
    meta = lora.metadata
    return [
        ("file", lora.file_name),
        ("base model", meta.get("ss_sd_model_name") or NONE),
        ("rank", meta.get("ss_network_dim") or lora.rank or train.get("lora_rank", NONE)),
        ("alpha", meta.get("ss_network_alpha") or train.get("lora_alpha", NONE)),
        ("targets", _targets(train)),
        ("adapted layers", lora.modules),
        ("trainable parameters", f"{lora.parameters:,}"),
        ("file size", f"{fmt_bytes(lora.size_bytes)} ({lora.size_bytes:,} bytes)"),
        ("sha256", lora.sha256),
        ("optimizer steps", meta.get("ss_steps", NONE)),
        ("epochs completed", meta.get("ss_epoch", NONE)),
    ]


TRAIN_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "max_steps", "num_epochs",
              "batch_size", "gradient_accumulation_steps", "image_size", "precision",
              "min_snr_gamma", "noise_offset", "caption_dropout", "lora_dropout", "use_ema",
              "seed")  # fmt: skip


def _run_fields(series: Mapping, skipped: int) -> list[tuple[str, object]]:
    steps, losses = series["loss"]
    speed = series["images_per_s"][1]
    return [
        ("logged steps", len(steps)),
        ("last step", steps[-1] if steps else NONE),
        ("final loss (smoothed)", fmt(charts.smooth(losses)[-1]) if losses else NONE),
        ("lowest loss (logged)", fmt(min(losses)) if losses else NONE),
        ("skipped updates (non-finite)", skipped),
        ("mean images/s", fmt(sum(speed) / len(speed)) if speed else NONE),
    ]


CHARTS = (  # column, title, y label, smoothed, note when empty
    ("loss", "training loss", "loss", True, "no loss logged yet"),
    ("lr", "learning rate", "lr", False, "no learning rate logged"),
    ("grad_norm", "gradient norm (before clipping)", "norm", True, "no gradient norm logged"),
    ("images_per_s", "throughput", "images/s", True, "no throughput logged"),
    ("peak_mem_gb", "peak GPU memory", "GiB", False, "not measured (CPU run)"),
)


def training_page(
    lora: LoraSummary | None, train: Mapping, series: Mapping, skipped: int, run: str = ""
) -> str:
    """LoRA summary, run figures and one chart per logged metric over the optimizer steps."""
    sections = ["<h3>LoRA</h3>"]
    if lora is None:
        sections.append(note("no LoRA file found"))
    else:
        sections.append(fields_table([("run", run or NONE), *lora_fields(lora, train)]))
    sections += ["<h3>Run</h3>", fields_table(_run_fields(series, skipped))]
    settings = [(k, fmt(train[k])) for k in TRAIN_KEYS if k in train]
    if settings:
        sections += ["<h3>Settings</h3>", fields_table(settings)]
    elif not train:
        sections.append(note("the run's config.json was not found beside the LoRA"))
    sections.append("<h3>Over the steps</h3>")
    for column, title, y_label, smoothed, empty in CHARTS:
        steps, values = series[column]
        sections.append(charts.line_chart_svg(steps, values, title, y_label=y_label,
                                              smoothed=smoothed, empty_note=empty))  # fmt: skip
    return page("Training", sections)


# ---------------------------------------------------------------------------------------------
# Dataset


def _kept_dropped(kept: int, problems: Sequence[dict]) -> list[str]:
    dropped, warnings, files = problem_counts(problems)
    rows = [("kept (trained on)", kept)] + [
        (f"dropped: {k}", n) for k, n in sorted(dropped.items())
    ]
    out = [table(["items", "count"], rows, total=("files dropped", files))]
    if warnings:
        out += ["<h4>Warnings (items kept)</h4>",
                table(["kind", "count"], sorted(warnings.items()))]  # fmt: skip
    else:
        out.append("<p>No warnings.</p>")
    return out


def _bucket_chart(buckets: Mapping[tuple[int, int], int]) -> str:
    labels = [f"{w}x{h}" for w, h in buckets]
    return charts.bar_chart_svg(labels, list(buckets.values()), "training items per bucket",
                                x_label="bucket (width x height, px)", y_label="items",
                                empty_note="no latent cache records found")  # fmt: skip


def _token_chart(token_counts: Sequence[int]) -> list[str]:
    edges, counts = token_bins(token_counts, CLIP_LIMIT)
    over = sum(c > CLIP_LIMIT for c in token_counts)
    svg = charts.histogram_svg(edges, counts, "caption length", x_label="CLIP tokens "
                               "(with start and end)", y_label="captions",
                               marker=(CLIP_LIMIT + 0.5, f"CLIP limit: {CLIP_LIMIT} tokens"),
                               empty_note="no captions to count")  # fmt: skip
    if not token_counts:
        return [svg]
    text = (f"{len(token_counts)} captions, {min(token_counts)} to {max(token_counts)} tokens; "
            f"{over} longer than {CLIP_LIMIT} (CLIP ignores what is past the limit).")  # fmt: skip
    return [f"<p>{esc(text)}</p>", svg]


def data_page(
    kept: int, problems: Sequence[dict], buckets: Mapping[tuple[int, int], int],
    token_counts: Sequence[int] | None,
) -> str:  # fmt: skip
    """Kept/dropped counts, the bucket histogram and the caption lengths (None: no tokenizer)."""
    sections = ["<h3>Items</h3>", *_kept_dropped(kept, problems), "<h3>Aspect-ratio buckets</h3>",
                _bucket_chart(buckets), "<h3>Caption lengths</h3>"]  # fmt: skip
    if token_counts is None:
        sections.append(note("caption lengths not counted: no CLIP tokenizer in the model folder"))
    else:
        sections += _token_chart(token_counts)
    return page("Dataset", sections)


# ---------------------------------------------------------------------------------------------
# Generated dataset

GENERATE_KEYS = ("num_images", "images_per_shard", "batch_size", "lora_scale", "merge_lora",
                 "shuffle_prompts", "compile", "fused_qkv")  # fmt: skip


def generation_fields(records: Sequence[dict], settings: Mapping) -> list[tuple[str, object]]:
    """Generation settings as recorded in the images' metadata, then the config's extras."""
    first = records[0] if records else {}
    size = f"{first['width']}x{first['height']}" if "width" in first else first.get("size")
    base_seed = first.get("base_seed", settings.get("seed"))
    pairs = [("images in the dataset", len(records)), ("sampler", first.get("sampler")),
             ("steps", first.get("steps")), ("guidance scale", first.get("cfg_scale")),
             ("size", size), ("base seed (image i: seed + i)", base_seed),
             ("precision", first.get("precision")), ("model", first.get("model")),
             ("LoRA", first.get("lora")),
             ("negative prompt", (first.get("negative_prompt") or "(none)") if first else None)]  # fmt: skip
    pairs += [(k, settings[k]) for k in GENERATE_KEYS if k in settings]
    return [(k, fmt(v)) for k, v in pairs]


def _span(start: object, stop: object) -> str:
    """Image indices start..stop-1 (a shard's marker holds the half-open range)."""
    whole = isinstance(start, int) and isinstance(stop, int) and stop > start
    return f"{start}–{stop - 1}" if whole else NONE


def _shard_row(m: Mapping) -> list[object]:
    span = _span(m.get("start"), m.get("stop"))
    return [fmt(m.get("shard")), span, fmt(m.get("made")), fmt(m.get("reused")),
            fmt(m.get("seconds"), 3), fmt(m.get("images_per_s"), 3), fmt(m.get("device")),
            fmt(m.get("peak_mem_gb"), 3)]  # fmt: skip


def _sum(markers: Sequence[Mapping], key: str) -> float:
    return sum(v for m in markers if isinstance(v := m.get(key), int | float))


def shards_table(markers: Sequence[Mapping]) -> str:
    """One row per generate job; the total row sums images and job seconds."""
    headers = ["shard", "images", "made", "reused", "seconds", "images/s", "device", "peak GiB"]
    total = ["total", NONE, int(_sum(markers, "made")), int(_sum(markers, "reused")),
             round(_sum(markers, "seconds"), 1), NONE, NONE, NONE]  # fmt: skip
    return table(headers, [_shard_row(m) for m in markers], total=total)


def _figure(record: Mapping, uri: str | None) -> str:
    """One sample: its thumbnail with prompt, seed and file name underneath."""
    prompt = str(record.get("prompt", ""))
    picture = (f'<img src="{esc(uri)}" alt="{esc(prompt)}" width="192">' if uri
               else '<p class="note">image not readable</p>')  # fmt: skip
    seed, name = esc(record.get("seed", NONE)), esc(record.get("file_name", ""))
    caption = f"{esc(prompt)}<br>seed {seed} · {name}"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def generation_page(
    records: Sequence[dict], markers: Sequence[Mapping], settings: Mapping,
    samples: Sequence[tuple[Mapping, str | None]],
) -> str:  # fmt: skip
    """Settings, the per-shard table and sample images (record, thumbnail data: URI)."""
    sections = ["<h3>Settings</h3>", fields_table(generation_fields(records, settings)),
                "<h3>Shards</h3>"]  # fmt: skip
    sections.append(shards_table(markers) if markers else note("no shard markers found"))
    sections.append("<p>Made: images generated by this run; reused: images already on disk "
                    "with the same parameters. Seconds are per job (jobs may run in parallel).</p>")  # fmt: skip
    sections.append(f"<h3>Samples ({len(samples)} of {len(records)}, evenly spaced)</h3>")
    if samples:
        sections.append(
            '<div class="figures">' + "\n".join(_figure(r, u) for r, u in samples) + "</div>"
        )
    else:
        sections.append(note("no images in the dataset"))
    return page("Generated dataset", sections)


# ---------------------------------------------------------------------------------------------
# Runtime


def _share(seconds: float | None, total: float) -> str:
    """A job's part of the summed runtime: where the time went."""
    return NONE if seconds is None or total <= 0 else f"{100 * seconds / total:.1f}%"


def runtime_page(rows: Sequence[BenchmarkRow]) -> str:
    """Every job's runtime and peak memory (Snakemake benchmarks) and the total."""
    if not rows:
        return page("Runtime", [note("no benchmark files were given to the report")])
    measured = [r for r in rows if r.seconds is not None]
    seconds = sum(r.seconds for r in measured)
    body = [[r.rule, r.wildcard or NONE, _round(r.seconds), fmt_hms(r.seconds),
             _share(r.seconds, seconds), _round(r.max_rss_mb)] for r in rows]  # fmt: skip
    rss = max((r.max_rss_mb for r in rows if r.max_rss_mb is not None), default=None)
    total = [f"total ({len(measured)} jobs)", NONE, round(seconds, 1), fmt_hms(seconds), "100%",
             _round(rss)]  # fmt: skip
    headers = ["rule", "job", "seconds", "h:m:s", "share", "peak RSS (MB)"]
    sections = [table(headers, body, total=total),
                "<p>The total adds the jobs' runtimes (jobs may have run in parallel); its peak "
                "RSS is the largest single job's.</p>"]  # fmt: skip
    missing = len(rows) - len(measured)
    if missing:
        sections.append(note(f"{missing} job(s) have no benchmark recorded (shown as {NONE})."))
    return page("Runtime", sections)
