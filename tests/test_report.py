"""Report pieces: every page is drawn from synthetic stage outputs without a plotting library,
shows what it promises, escapes hostile strings and notes what is missing instead of failing."""

from __future__ import annotations

import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdxl.data.dataset import Item, Problem, ValidationResult, write_manifest, write_problems
from sdxl.images import make_grid
from sdxl.report import (
    ReportInputs,
    ReportOutputs,
    build_report,
    clip_token_counter,
    config_page,
    loss_curve_svg,
    nice_ticks,
    read_loss,
    smooth,
    write_config_snapshot,
    write_loss_curve,
)
from sdxl.report.charts import HEIGHT, MARGIN, MAX_POINTS, WIDTH
from sdxl.report.images import GAP, HEADER_LINES, LABEL_W, LINE_H, MIN_COLUMN
from sdxl.report.readers import read_benchmarks, spread, token_bins

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "</script><img src=x onerror=alert(1)>"
HOSTILE_NAME = "<img src=x onerror=alert(2)>"  # no "/": usable as a file name
RAW, ESCAPED = "<img src=x", "&lt;img src=x"
COLOURS = {2: ["red", "lime"], 4: ["blue", "yellow"]}  # validation cells per snapshot step
PAGES = ("training", "data", "generation", "runtime", "config")


# ---------------------------------------------------------------------------------------------
# Synthetic outputs of every stage


def _png(path: Path, colour: str = "gray", size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _lora(run_dir: Path) -> Path:
    """A two-layer kohya file: 4*16 + 16*4 + 4*8 + 8*4 = 192 trainable numbers."""
    tensors = {"lora_unet_a.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_a.lora_up.weight": torch.zeros(16, 4), "lora_unet_a.alpha": torch.tensor(8.0),
               "lora_unet_b.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_b.lora_up.weight": torch.zeros(8, 4), "lora_unet_b.alpha": torch.tensor(8.0)}  # fmt: skip
    meta = {"ss_network_dim": "4", "ss_network_alpha": "8", "ss_steps": "4", "ss_epoch": "2",
            "ss_sd_model_name": HOSTILE}  # fmt: skip
    path = run_dir / "lora_final.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _training_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "step,epoch,loss,lr,grad_norm,images_per_s,peak_mem_gb,skipped\n"
        "1,0,0.5,1e-4,2.0,3.0,,0\n2,0,0.4,1e-4,1.5,3.5,,1\n3,1,nan,5e-5,1.2,3.2,,0\n"
        "4,1,0.3,1e-5,1.0,3.1,,0\n"
    )
    train = {"lora_rank": 4, "lora_alpha": 8, "lora_targets": [HOSTILE, "attn2"], "lora_conv": True,
             "learning_rate": 1e-4, "lr_scheduler": "cosine", "max_steps": 4, "batch_size": 2,
             "precision": "fp32", "seed": 0}  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(train))
    return _lora(run_dir)


def _validation(folder: Path, steps=(2, 4)) -> Path:
    """index.json with one make_grid() per step: the prompts' solid-colour images."""
    folder.mkdir(parents=True)
    prompts = [HOSTILE, "a blue square"]
    grids = []
    for step in steps:
        images = [Image.new("RGB", (16, 16), c) for c in COLOURS[step]]
        make_grid(images, prompts).save(folder / f"step-{step:07d}.png")
        grids.append({"step": step, "lora": f"demo-step{step:07d}.safetensors", "sha256": "0" * 64,
                      "file": f"step-{step:07d}.png"})  # fmt: skip
    index = {"run": "demo", "prompts": prompts, "seed": 0, "size": 16, "guidance_scale": 7.5,
             "sampling_steps": 2, "grids": grids}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    return folder / "index.json"


def _data(folder: Path) -> tuple[Path, Path, Path]:
    """manifest (3 kept items), problems (2 dropped files, 1 warning) and the problems page."""
    folder.mkdir(parents=True)
    items = [Item(f"{k}.png", f"/d/{k}.png", caption, 64, 64, str(k))
             for k, caption in enumerate(["a", "b c d", HOSTILE])]  # fmt: skip
    problems = (Problem(f"{HOSTILE_NAME}.png", "missing_caption", HOSTILE, "write one", True),
                Problem("x.png", "too_small", "2x2", "bigger", True),
                Problem("x.png", "missing_caption", "none", "write one", True),
                Problem("2.png", "long_caption", "long", "shorten", False),
                Problem("2.png", HOSTILE, "a kind from a hand-edited table", "-", False))  # fmt: skip
    write_manifest(items, folder / "manifest.csv")
    result = ValidationResult("/d", tuple(items), problems)
    write_problems(result, folder / "problems.tsv", folder / "problems.html")
    return folder / "manifest.csv", folder / "problems.tsv", folder / "problems.html"


def _latents(folder: Path) -> Path:
    """Two 64x64 items (one also mirrored) and one 96x32 item."""
    folder.mkdir(parents=True)
    records = [{"key": "000000", "bucket": [64, 64], "flipped": False},
               {"key": "000000-flip", "bucket": [64, 64], "flipped": True},
               {"key": "000001", "bucket": [64, 64], "flipped": False},
               {"key": "000002", "bucket": [96, 32], "flipped": False}]  # fmt: skip
    (folder / "shard-00000.json").write_text(json.dumps({"kind": "latents", "items": records}))
    (folder / "index.json").write_text(json.dumps({"kind": "latents", "shards": ["shard-00000"]}))
    return folder / "index.json"


def _generation(root: Path) -> tuple[list[Path], Path, Path]:
    """Two shard markers (the second made nothing), metadata.jsonl and two images."""
    markers = [{"shard": 0, "folder": "g/shard-0", "start": 0, "stop": 2, "files": [], "made": 2,
                "reused": 0, "seconds": 4.0, "images_per_s": 0.5, "device": HOSTILE,
                "peak_mem_gb": None},
               {"shard": 1, "folder": "g/shard-1", "start": 2, "stop": 3, "files": [], "made": 0,
                "reused": 1, "seconds": 0.5, "images_per_s": None, "device": "cpu",
                "peak_mem_gb": None}]  # fmt: skip
    paths = []
    for m in markers:
        paths.append(root / f"generate/shard-{m['shard']}.json")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_text(json.dumps(m))
    dataset = root / "dataset"
    records = [{"index": i, "file_name": f"{i:05d}.png", "prompt": f"{HOSTILE} {i}",
                "negative_prompt": HOSTILE, "seed": 100 + i, "base_seed": 100, "sampler": "euler",
                "steps": 2, "cfg_scale": 7.5, "width": 16, "height": 16, "model": HOSTILE,
                "lora": "demo.safetensors:1", "precision": "fp32"} for i in range(3)]  # fmt: skip
    for r in records[:2]:  # the third image is missing
        _png(dataset / r["file_name"], "purple")
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths, dataset / "metadata.jsonl", _png(dataset / "contact_sheet.png", "orange")


def _benchmarks(folder: Path) -> list[Path]:
    """Benchmarks out of pipeline order, one missing, one empty, one with NA memory."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {"generate/shard-10.tsv": "3.0\t0:00:03\t200.5\t1\t1\t1\t0\t0\t0\t1\n",
             "generate/shard-2.tsv": "2.0\t0:00:02\tNA\t-\t-\t-\t-\t-\t-\t-\n",
             "weights.tsv": "3600.0\t1:00:00\t100.0\t1\t1\t1\t0\t0\t0\t1\n",
             f"cache_latents/{HOSTILE_NAME}.tsv": "1.0\t0:00:01\t50\t1\t1\t1\t0\t0\t0\t1\n"}  # fmt: skip
    paths = []
    for name, row in files.items():
        paths.append(folder / name)
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_text(header + row)
    (folder / "cache_text.tsv").write_text("")
    return [*paths, folder / "cache_text.tsv", folder / "train_lora/demo.tsv"]


def _workflow_config(path: Path) -> Path:
    config = {"run": "demo", "data": {"dir": HOSTILE},
              "generate": {"num_images": 3, "images_per_shard": 2, "negative_prompt": HOSTILE,
                           "batch_size": 1, "lora_scale": 1.0}}  # fmt: skip
    return write_config_snapshot(config, path)


@pytest.fixture
def run(tmp_path) -> tuple[ReportInputs, ReportOutputs]:
    """Every input of the report rule, in a layout like results/ (inputs built as the script
    does, from an object with the rule's names)."""
    manifest, problems, problems_html = _data(tmp_path / "data")
    shards, metadata, sheet = _generation(tmp_path)
    named = SimpleNamespace(
        lora=_training_run(tmp_path / "train/demo"), validation=_validation(tmp_path / "val"),
        config=_workflow_config(tmp_path / "config.json"), manifest=manifest, problems=problems,
        problems_html=problems_html, latents=_latents(tmp_path / "latents"),
        model=tmp_path / "no-model", shards=shards, metadata=metadata, sheet=sheet,
        benchmarks=_benchmarks(tmp_path / "benchmarks"), code=["ignored.py"],
    )  # fmt: skip
    out = tmp_path / "report"
    names = {"training": "training.html", "loss": "loss_curve.svg", "data": "data.html",
             "validation": "validation_over_time.png", "problems": "problems.html",
             "generation": "generation.html", "sheet": "contact_sheet.png",
             "runtime": "runtime.html", "config": "config.html"}  # fmt: skip
    outputs = ReportOutputs.of(SimpleNamespace(**{k: out / v for k, v in names.items()}))
    return ReportInputs.of(named), outputs


def _count_tokens(caption: str) -> int:
    """Stands in for CLIP: one token per character plus start and end (fast, no model)."""
    return len(caption) + 2


@pytest.fixture
def built(run) -> ReportOutputs:
    inputs, outputs = run
    build_report(inputs, outputs, token_count=_count_tokens)
    return outputs


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg .*?</svg>", page, re.DOTALL)]


def _text(page: str) -> str:
    """The page's text as a browser shows it (entities decoded)."""
    parser = _Tags()
    parser.feed(page)
    return " ".join(parser.text)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


# ---------------------------------------------------------------------------------------------
# The loss curve and helpers


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


def test_long_runs_are_thinned_for_drawing_but_smoothed_over_every_step():
    steps = list(range(1, 10_002))
    root = ET.fromstring(loss_curve_svg(steps, [float(s % 2) for s in steps]))
    raw, smoothed = root.findall(f"{SVG}polyline")
    assert len(raw.get("points").split()) <= MAX_POINTS + 1
    last_x = [float(p.split(",")[0]) for p in raw.get("points").split()][-1]
    assert last_x == pytest.approx(WIDTH - MARGIN["right"])  # the last step is always drawn
    ys = [float(p.split(",")[1]) for p in smoothed.get("points").split()][10:]  # past the ramp
    assert max(ys) - min(ys) < 0.5 * (HEIGHT - MARGIN["top"] - MARGIN["bottom"])  # an average


def test_missing_metrics_give_a_placeholder(tmp_path):
    root = ET.parse(write_loss_curve(tmp_path / "none.csv", tmp_path / "loss.svg")).getroot()
    assert root.findall(f"{SVG}polyline") == []
    assert "no loss logged" in "".join(root.itertext())


def test_helpers():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # no ramp up from zero
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    page = config_page({"train": {"lr": 1e-4, "note": "<b>"}})
    assert "<h3>train</h3>" in page and "&lt;b&gt;" in page
    assert spread(3, 16) == [0, 1, 2] and spread(100, 3) == [0, 50, 99]


def test_token_bins_put_the_clip_limit_between_two_bars():
    counts = [2, 5, 40, 77, 78, 120]
    edges, histogram = token_bins(counts, 77)
    assert 77.5 in edges and sum(histogram) == len(counts)
    limit = edges.index(77.5)
    assert sum(histogram[limit:]) == 2  # 78 and 120 tokens: cut off by CLIP
    assert edges[0] <= 2 and edges[-1] >= 120


def test_clip_token_counter_reads_the_model_folders_tokenizer(tiny_dir, tmp_path):
    count = clip_token_counter(tiny_dir)
    assert count("") == 2  # start and end tokens
    assert count("a red circle on a white background") > count("a red circle") > 2
    assert clip_token_counter(tmp_path) is None  # no tokenizer: the page notes it


# ---------------------------------------------------------------------------------------------
# The pages


def test_every_item_is_written_and_copies_are_exact(run, built):
    inputs, _ = run
    for path in vars(built).values():
        assert path.is_file(), path
    assert built.problems.read_bytes() == inputs.problems_html.read_bytes()
    assert built.sheet.read_bytes() == inputs.sheet.read_bytes()
    assert ET.parse(built.loss).getroot().findall(f"{SVG}polyline")


def test_training_page_summarises_the_lora_and_charts_every_metric(run, built):
    inputs, _ = run
    page = _read(built.training)
    text = _text(page)
    sha = hashlib.sha256(inputs.lora.read_bytes()).hexdigest()
    for expected in ("rank 4", "alpha 8", "trainable parameters 192", "adapted layers 2", sha,
                     f"{inputs.lora.stat().st_size:,} bytes", "attn2", "(+ conv layers)",
                     "skipped updates (non-finite) 1", "logged steps 3"):  # fmt: skip
        assert expected in " ".join(text.split()), expected
    titles = [svg.find(f"{SVG}text").text for svg in _svgs(page)]
    assert titles == ["training loss", "learning rate", "gradient norm (before clipping)",
                      "throughput", "peak GPU memory"]  # fmt: skip
    assert [len(s.findall(f"{SVG}polyline")) for s in _svgs(page)] == [2, 1, 2, 2, 0]
    assert "not measured (CPU run)" in text  # the empty peak-memory chart says why


def test_validation_png_has_a_row_per_step_and_a_column_per_prompt(built):
    with Image.open(built.validation) as image:
        sheet = image.convert("RGB")
    header = LINE_H * HEADER_LINES + 8
    column, pitch = MIN_COLUMN + GAP, 16 + GAP  # 16 px cells, centred in their columns
    assert sheet.size == (LABEL_W + 2 * column, header + 2 * pitch)
    for row, step in enumerate((2, 4)):
        for col, colour in enumerate(COLOURS[step]):
            centre = (LABEL_W + col * column + MIN_COLUMN // 2, header + row * pitch + 8)
            assert sheet.getpixel(centre) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))


def test_validation_off_gives_a_png_saying_how_to_turn_it_on(run, tmp_path):
    inputs, outputs = run
    index = json.loads(inputs.validation.read_text())
    inputs.validation.write_text(json.dumps({**index, "grids": []}))
    build_report(inputs, outputs, token_count=_count_tokens)
    with Image.open(outputs.validation) as image:
        assert image.width == 560 and image.height < 200  # the small note, not a grid


def test_data_page_counts_items_buckets_and_caption_tokens(built):
    page = _read(built.data)
    text = " ".join(_text(page).split())
    assert "kept (trained on) 3" in text
    assert "dropped: missing_caption 2 dropped: too_small 1 files dropped 2" in text
    assert "long_caption 1" in text  # warnings, counted apart
    buckets, tokens = _svgs(page)
    bars = buckets.findall(f"{SVG}rect[@class='bar']")
    assert [b.find(f"{SVG}title").text for b in bars] == [
        "64x64: 2",
        "96x32: 1",
    ]  # mirrors left out
    assert len(tokens.findall(f"{SVG}line[@class='marker']")) == 1
    assert "CLIP limit: 77 tokens" in "".join(tokens.itertext())
    assert sum(int(b.find(f"{SVG}title").text.split(": ")[1])
               for b in tokens.findall(f"{SVG}rect[@class='bar']")) == 3  # fmt: skip
    assert "3 captions, 3 to 39 tokens; 0 longer than 77" in text


def test_data_page_without_a_tokenizer_says_so(run):
    inputs, outputs = run
    build_report(inputs, outputs)  # inputs.model holds no tokenizer
    assert "caption lengths not counted" in _read(outputs.data)


def test_generation_page_has_settings_a_row_per_shard_and_samples(built):
    page = _read(built.generation)
    text = " ".join(_text(page).split())
    for expected in ("sampler euler", "steps 2", "guidance scale 7.5", "size 16x16",
                     "base seed (image i: seed + i) 100", "precision fp32",
                     "images_per_shard 2", "images in the dataset 3"):  # fmt: skip
        assert expected in text, expected
    rows = re.findall(r"<tr>.*?</tr>|<tr class=\"total\">.*?</tr>", page.split("<h3>Shards")[1])
    shard_rows = [r for r in rows if "<th>" not in r]
    assert len(shard_rows) == 3  # two shards and the total
    assert "0–1" in shard_rows[0] and "2–2" in shard_rows[1] and "—" in shard_rows[1]
    assert ">2<" in shard_rows[2] and ">1<" in shard_rows[2] and ">4.5<" in shard_rows[2]
    images = [attrs for tag, attrs in _tags(page) if tag == "img"]
    assert len(images) == 2 and all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    assert "image not readable" in text  # the missing third image
    assert "seed 100" in text and "seed 102" in text


def test_runtime_page_lists_jobs_in_pipeline_order_with_a_total(built):
    text = " ".join(_text(_read(built.runtime)).split())
    order = ["weights", "cache_latents", "cache_text", "train_lora", "shard-2", "shard-10"]
    positions = [text.index(name) for name in order]
    assert positions == sorted(positions)
    assert "3600.0 1:00:00 99.8% 100.0" in text
    assert "total (4 jobs) — 3606.0 1:00:06 100% 200.5" in text
    assert "2 job(s) have no benchmark recorded" in text  # the empty and the missing file


def test_benchmark_paths_name_rule_and_wildcard(tmp_path):
    rows = read_benchmarks([tmp_path / "results/benchmarks/generate/shard-1.tsv",
                            tmp_path / "results/benchmarks/assemble.tsv"])  # fmt: skip
    assert [(r.rule, r.wildcard, r.seconds) for r in rows] == [
        ("generate", "shard-1", None), ("assemble", "", None)]  # fmt: skip


def test_inputs_take_one_path_or_a_list_where_the_rule_gives_a_list(run):
    inputs, _ = run
    named = SimpleNamespace(**{**vars(inputs), "shards": str(inputs.shards[0])})
    assert ReportInputs.of(named).shards == inputs.shards[:1]
    assert ReportInputs.of(SimpleNamespace(**vars(inputs))) == inputs


def _tags(page: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def test_hostile_strings_appear_only_escaped(built):
    for name in PAGES:
        page = _read(getattr(built, name))
        assert RAW not in page and "</script>" not in page, name
        assert ESCAPED in page, name  # the hostile string is shown, as text
        tags = _tags(page)
        assert not [t for t, attrs in tags for a in attrs if a.startswith("on")], name
        assert "script" not in {t for t, _ in tags}, name
        for tag, attrs in tags:
            assert tag != "img" or attrs["src"].startswith("data:image/"), name
    assert HOSTILE in _text(_read(built.generation))  # the prompt under its image


def test_missing_run_files_give_notes_not_a_crash(run):
    inputs, outputs = run
    for name in ("metrics.csv", "config.json"):
        (inputs.lora.parent / name).unlink()
    for marker in inputs.shards:
        marker.unlink()
    build_report(inputs, outputs, token_count=_count_tokens)
    text = _text(_read(outputs.training))
    assert "no loss logged yet" in text and "config.json was not found" in text
    assert "no shard markers found" in _text(_read(outputs.generation))
    assert html.escape(HOSTILE) in _read(outputs.config)


def test_config_page_comes_from_the_snapshot_escaped(built):
    page = _read(built.config)
    assert HOSTILE not in page and html.escape(HOSTILE) in page
    assert "<h3>generate</h3>" in page


def test_grid_cells_cut_out_samples_of_mixed_sizes_exactly():
    """Sample prompts may set each image's size (--w/--h): the report cuts each one out whole."""
    from sdxl.report.images import grid_cells

    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 128), "blue"),
              Image.new("RGB", (32, 64), "green")]  # fmt: skip
    grid = make_grid(images, ["a", "b", "c"])
    cells = grid_cells(grid, 3, 64, [im.size for im in images])
    assert [c.size for c in cells] == [im.size for im in images]
    assert all(list(c.getdata()) == list(im.getdata()) for c, im in zip(cells, images, strict=True))
