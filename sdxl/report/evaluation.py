"""The report's Evaluation page: FID, KID and CLIP score of the generated dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from sdxl.report.pages import fields_table, fmt, note, page
from sdxl.utils import atomic_write_text

DISABLED = "Evaluation is off (evaluate.enabled: false in config.yaml)."


def metric_fields(m: Mapping) -> list[tuple[str, object]]:
    """The metrics table: the values, then what they were measured on and with."""
    ref, inception = m["reference"], m["inception"]
    kid = f"{fmt(m['kid_mean'], 5)} ± {fmt(m['kid_std'], 3)}"
    return [
        ("FID (lower is better)", fmt(m["fid"], 6)),
        ("KID mean ± std", kid),
        ("KID subsets x size", f"{m['kid_subsets']} x {m['kid_subset_size']}"),
        ("CLIP score (100 cos, higher is better)", fmt(m["clip_score"], 6)),
        ("generated images", m["n_images"]),
        ("generated from", m["images"]),
        ("reference images", ref["n_images"]),
        ("reference", ref["source"]),
        ("Inception", f"{inception['model']} ({inception['weights']}, {inception['features']}-d)"),
        ("CLIP model", fmt(m["clip_model"])),
        ("conventions", m["conventions"]),
    ]


def evaluation_page(metrics: Mapping | None) -> str:
    """The page from metrics.json's content (None: evaluation disabled)."""
    if metrics is None:
        return page("Evaluation", [note(DISABLED)])
    sections = [fields_table(metric_fields(metrics))]
    if metrics["n_images"] < 2048 or metrics["reference"]["n_images"] < 2048:
        sections.append(note("Fewer than 2048 images on a side: FID is biased upwards and "
                             "not comparable with published numbers (which use 10k-50k)."))  # fmt: skip
    return page("Evaluation of the generated dataset", sections)


def write_evaluation(metrics_json: str | os.PathLike | None, out_html: str | os.PathLike) -> None:
    metrics = None
    if metrics_json:
        with open(metrics_json, encoding="utf-8") as f:
            metrics = json.load(f)
    atomic_write_text(out_html, evaluation_page(metrics))
