"""The HTML report in a real browser: every page shows, with its images and tables, and runs
nothing it displays.

Headless Chromium (the system's `chromium`, driven by Playwright, which downloads no browser of
its own) opens the demo run's results/report.html (the run of tests/test_workflow.py, with
hostile strings in every user-controlled field) and clicks through every menu item, category,
subcategory and result. Screenshots of the pages go to the test's tmp folder, or to
$SDXL_SCREENSHOT_DIR (docs/report.png is one of them). SDXL_SKIP_BROWSER=1 skips these tests on
a machine without chromium; CI (.ci/run) installs it and never skips.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_workflow import HOSTILE, HOSTILE_CONFIG, HOSTILE_DATA_DIR, _demo_run

# The tests of the demo run (this module and its siblings share it) run on one xdist worker.
pytestmark = pytest.mark.xdist_group("demo")

VIEWPORT = {"width": 1280, "height": 800}
GENERAL = ("Workflow", "Statistics", "About")  # Snakemake's own menu items
# What one view's document (the report page itself, or the result shown in its frame) holds.
INSPECT = """() => ({
    images: [...document.images].map(i => ({
        name: i.alt || i.src.slice(0, 60), loaded: i.complete && i.naturalWidth > 0})),
    tables: [...document.querySelectorAll("table")].map(t => ({
        head: (t.rows[0] ? t.rows[0].innerText : "").slice(0, 60),
        rows: [...t.rows].filter(r => r.querySelector("td")).length})),
    charts: document.querySelectorAll("svg, canvas").length,
    handlers: [...document.querySelectorAll("*")].flatMap(el => [...el.attributes]
        .filter(a => a.name.startsWith("on")).map(a => el.tagName + "[" + a.name + "]")),
    text: document.body.innerText,
})"""
IMAGES_DONE = "[...document.images].every(i => i.complete)"


@dataclass
class Walk:
    """What the browser met: each view's documents, and everything that went wrong."""

    report: Path
    screenshots: Path  # one PNG per view
    views: dict[str, list[dict]] = field(default_factory=dict)  # view -> page (+ its frame)
    rows: dict[str, tuple] = field(default_factory=dict)  # subcategory -> (results, table rows)
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt: markup that ran
    requests: list[str] = field(default_factory=list)  # anything off this machine


def chromium() -> str:
    """The system's Chromium; a missing one fails (CI), unless SDXL_SKIP_BROWSER=1."""
    if os.environ.get("SDXL_SKIP_BROWSER") == "1":
        pytest.skip("SDXL_SKIP_BROWSER=1: the report is not checked in a browser")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "no chromium on PATH: install it (apt-get install chromium; .ci/run does), "
            "or set SDXL_SKIP_BROWSER=1 to skip the browser tests on this machine"
        )
    return path


def _inspect(page, name: str, walk: Walk) -> None:
    """Record the page and, when it shows a result in a frame, that frame's document."""
    documents = []
    for frame in page.frames:
        frame.wait_for_load_state()
        frame.wait_for_function(IMAGES_DONE)
        documents.append(frame.evaluate(INSPECT))
    walk.views[name] = documents
    page.screenshot(path=walk.screenshots / f"{name}.png")


def _click(scope, label: str) -> None:
    scope.get_by_role("link", name=label, exact=True).click()


def _open_subcategory(page, category: str, subcategory: str, single: bool) -> None:
    """From the landing page, through the menu, to one subcategory's table of results."""
    page.locator("nav ol a").first.click()  # the breadcrumbs' home
    _click(page.locator("nav"), category)
    if not single:  # a category of one subcategory opens it at once
        _click(page.locator("nav"), subcategory)


def _show(page, path: str, button: int) -> None:
    """Press a result row's eye (0: show it) or information (1) button; wait for it to show."""
    row = page.locator("nav table tbody tr").filter(has_text=path)
    row.locator("td").last.locator("a").nth(button).click()
    if button == 0:
        shown = "document.querySelector('iframe, div.p-3 > img')"
        page.wait_for_function(f"p => ({shown} || {{}}).src === results[p].data_uri", arg=path)


def _walk_results(page, walk: Walk) -> None:
    categories = page.evaluate("categories")
    for category, subcategories in sorted(categories.items()):
        for subcategory, paths in sorted(subcategories.items()):
            _open_subcategory(page, category, subcategory, single=len(subcategories) == 1)
            rows = page.locator("nav table tbody tr").all_inner_texts()
            walk.rows[subcategory] = (sorted(paths), sorted(row.strip() for row in rows))
            for path in paths:
                _show(page, path, button=0)
                _inspect(page, Path(path).stem, walk)
                _show(page, path, button=1)
                _inspect(page, f"{Path(path).stem}-info", walk)
                _open_subcategory(page, category, subcategory, len(subcategories) == 1)


def walk_report(report: Path, executable: str, screenshots: Path) -> Walk:
    """Open `report` in one headless Chromium and click through all of it."""
    from playwright.sync_api import sync_playwright

    walk = Walk(report, screenshots)
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(10_000)  # each step takes well under a second
            page.on("console", lambda m: m.type == "error" and walk.errors.append(m.text))
            page.on("pageerror", lambda e: walk.errors.append(f"uncaught: {e}"))
            page.on("dialog", lambda d: (walk.dialogs.append(d.message), d.dismiss()))
            page.route("http*://**", lambda r: (walk.requests.append(r.request.url), r.abort()))
            page.goto(report.as_uri())
            page.wait_for_selector("nav ol a")
            _inspect(page, "landing", walk)
            for item in GENERAL:
                _click(page.locator("nav"), item)
                _inspect(page, item.lower(), walk)
                page.locator("nav ol a").first.click()
            _walk_results(page, walk)
        finally:
            browser.close()
    return walk


def _each(walk: Walk, kind: str):
    """(view, item) for each image, table or handler of every document the browser met."""
    for view, documents in walk.views.items():
        for document in documents:
            yield from ((view, item) for item in document[kind])


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Walk:
    executable = chromium()  # before the demo run: a skip or a missing browser waits for none
    shots = Path(os.environ.get("SDXL_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    report = _demo_run(tmp_path_factory) / "results/report.html"
    return walk_report(report, executable, shots)


def test_every_result_shows_without_errors(walk):
    assert walk.errors == [] and walk.dialogs == [] and walk.requests == []
    names = {"config", "problems", "training", "loss_curve", "validation_over_time", "data",
             "generation", "contact_sheet", "evaluation", "runtime"}  # fmt: skip
    general = {"landing", *(item.lower() for item in GENERAL)}
    assert set(walk.views) == general | names | {f"{name}-info" for name in names}
    assert all(paths == rows for paths, rows in walk.rows.values()), walk.rows
    html = {"config", "problems", "training", "data", "generation", "evaluation", "runtime"}
    assert {name for name in names if len(walk.views[name]) == 2} == html  # shown in a frame


def test_every_image_and_chart_shows(walk):
    broken = [(view, image["name"]) for view, image in _each(walk, "images") if not image["loaded"]]
    assert broken == []
    for name in ("loss_curve", "validation_over_time", "contact_sheet"):
        assert len(walk.views[name][0]["images"]) == 2, name  # Snakemake's logo and the image
    assert len(walk.views["generation"][1]["images"]) == 8  # every sample of the demo's 8
    for name in ("workflow", "statistics"):  # Snakemake's own (Vega) charts
        assert walk.views[name][0]["charts"], name
    for name in ("training", "data"):  # the curves and histograms, inline SVG
        assert walk.views[name][1]["charts"], name


def test_every_table_has_rows(walk):
    empty = [(view, table["head"]) for view, table in _each(walk, "tables") if not table["rows"]]
    assert empty == []
    for name in ("training", "data", "generation", "evaluation"):
        assert walk.views[name][1]["tables"], name
    rows = {
        name: [t["rows"] for t in walk.views[name][1]["tables"]] for name in ("problems", "runtime")
    }
    assert rows["problems"] == [2]  # the undecodable file and the long caption
    jobs = len(list((walk.report.parent / "benchmarks").rglob("*.tsv")))
    assert rows["runtime"] == [jobs + 1]  # every job, and the total


def test_hostile_strings_render_as_text(walk):
    handlers = list(_each(walk, "handlers"))
    assert handlers == []  # no on* attribute anywhere: no injected <img onerror>
    assert walk.dialogs == []
    text = {name: documents[-1]["text"] for name, documents in walk.views.items()}
    generate = HOSTILE_CONFIG["generate"]
    for shown in (HOSTILE.format(2), HOSTILE.format(5)):  # the negative prompt, a prompt
        assert shown in text["generation"]
    for shown in (HOSTILE_DATA_DIR, generate["negative_prompt"], generate["prompts_file"],
                  HOSTILE.format(4)):  # fmt: skip
        assert shown in text["config"]
    assert "<img src=x onerror=alert(7)>.png" in text["problems"]  # a file name


def test_screenshots_of_the_main_pages(walk):
    from PIL import Image

    for name in ("landing", "training", "generation", "validation_over_time", "data"):
        with Image.open(walk.screenshots / f"{name}.png") as shot:
            assert shot.size == (VIEWPORT["width"], VIEWPORT["height"])
            assert len(set(shot.convert("L").getdata())) > 16, name  # not a blank page
