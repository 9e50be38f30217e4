"""Report pieces: the loss curve is drawn from metrics.csv without a plotting library."""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET

import pytest

from sdxl.report import (
    build_report,
    config_page,
    nice_ticks,
    read_loss,
    smooth,
    write_config_snapshot,
    write_loss_curve,
)

SVG = "{http://www.w3.org/2000/svg}"


def test_loss_curve_svg_plots_every_logged_step(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "step,epoch,loss,lr\n1,0,0.5,1e-4\n2,0,nan,1e-4\n3,0,0.25,1e-4\n4,0,0.3,1e-4\n"
    )
    assert read_loss(metrics) == ([1, 3, 4], [0.5, 0.25, 0.3])
    root = ET.parse(write_loss_curve(metrics, tmp_path / "loss.svg")).getroot()
    raw, smoothed = root.findall(f"{SVG}polyline")
    points = [tuple(map(float, p.split(","))) for p in raw.get("points").split()]
    assert len(points) == 3 and points[0][0] < points[1][0] < points[2][0]
    assert points[1][1] > points[0][1]  # lower loss is drawn lower (larger y in SVG)
    assert len(smoothed.get("points").split()) == 3


def test_missing_metrics_give_a_placeholder(tmp_path):
    root = ET.parse(write_loss_curve(tmp_path / "none.csv", tmp_path / "loss.svg")).getroot()
    assert root.findall(f"{SVG}polyline") == []
    assert "no loss logged" in "".join(root.itertext())


def test_helpers():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # no ramp up from zero
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    page = config_page({"train": {"lr": 1e-4, "note": "<b>"}})
    assert "<h3>train</h3>" in page and "&lt;b&gt;" in page


def test_report_pages_come_from_the_config_snapshot_escaped(tmp_path):
    """The report rule renders the config page from record_config's JSON (its own params hold
    no user strings) and copies the other rules' pages it shows."""
    hostile = "</script><img src=x onerror=alert(1)>"
    snapshot = write_config_snapshot(
        {"generate": {"negative_prompt": hostile}}, tmp_path / "c.json"
    )
    (tmp_path / "problems.html").write_text("<p>problems</p>")
    build_report(
        tmp_path / "none.csv", tmp_path / "no-samples", snapshot,
        loss_svg=tmp_path / "r/loss.svg", config_html=tmp_path / "r/config.html",
        validation_dir=tmp_path / "r/validation",
        copies={tmp_path / "problems.html": tmp_path / "r/problems.html"},
    )  # fmt: skip
    page = (tmp_path / "r/config.html").read_text()
    assert hostile not in page and html.escape(hostile) in page
    assert (tmp_path / "r/problems.html").read_text() == "<p>problems</p>"
