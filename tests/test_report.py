"""Report pieces: the loss curve is drawn from metrics.csv without a plotting library."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from sdxl.report import config_page, nice_ticks, read_loss, smooth, write_loss_curve

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
