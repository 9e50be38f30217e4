"""COCO captions files as prompt files: both layouts, the three modes, the seeded order, the
source image ids in captions.json (CLI and pipeline), and malformed files as one line."""

from __future__ import annotations

import copy
import datetime
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from sdxl.cli.generate import main
from sdxl.errors import UserError
from sdxl.generate.prompts import expand_prompts, load_prompts
from sdxl.workflow_inputs import generation_settings

ROOT = Path(__file__).resolve().parents[1]
# COCO image id -> its captions in file order; 554625 has none (such images are skipped).
CAPTIONS = {
    391895: ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike."],
    522418: ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large cake.",
             "A   woman marking a cake\nwith the back of a knife."],
    184613: ["A child holding a flowered umbrella and petting a yak."],
    318219: ["A young boy standing in front of a computer keyboard.", "A boy at a keyboard.",
             "a little boy wearing headphones and looking at a computer monitor"],
    554625: [],
}  # fmt: skip
CAPTIONED = sorted(i for i, caps in CAPTIONS.items() if caps)


def clean(caption: str) -> str:
    return " ".join(caption.split())


def coco_data(layout: str) -> dict:
    """A small captions file in the layout of captions_val2014.json or captions_val2017.json."""
    split = "val2014" if layout == "2014" else "val2017"
    name = "COCO_val2014_{:012d}.jpg" if layout == "2014" else "{:012d}.jpg"
    ids = list(CAPTIONS) if layout == "2014" else list(reversed(CAPTIONS))  # file order varies
    images = [{"license": 3, "file_name": name.format(i),
               "coco_url": f"http://images.cocodataset.org/{split}/{name.format(i)}",
               "height": 480, "width": 640, "date_captured": "2013-11-14 11:18:45",
               "flickr_url": f"http://farm4.staticflickr.com/{i}.jpg", "id": i} for i in ids]  # fmt: skip
    # Annotations interleaved across images (as in the real files), each image's in order.
    pending = {i: list(caps) for i, caps in CAPTIONS.items()}
    annotations = []
    while any(pending.values()):
        for i in ids:
            if pending[i]:
                annotations.append({"image_id": i, "id": 700 + len(annotations),
                                    "caption": pending[i].pop(0)})  # fmt: skip
    info = {"description": f"COCO {layout} Dataset", "url": "http://cocodataset.org",
            "version": "1.0", "year": int(layout), "contributor": "COCO Consortium",
            "date_created": "2017/09/01"}  # fmt: skip
    licenses = [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 3,
                 "name": "Attribution License"}]  # fmt: skip
    data = {"info": info, "images": images, "licenses": licenses, "annotations": annotations}
    return {**data, "type": "captions"} if layout == "2014" else data


def write_coco(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco")
    return {
        "2014": write_coco(root / "captions_val2014.json", coco_data("2014")),
        "2017": write_coco(root / "captions_val2017.json", coco_data("2017")),
    }


def ids(sources: list[dict]) -> list[int]:
    return [s["coco_image_id"] for s in sources]


# ------------------------------------------------------------------------- reading the files


def test_both_layouts_give_the_same_prompts_with_their_sources(coco_files):
    got = {layout: load_prompts(path, 4, seed=0) for layout, path in coco_files.items()}
    assert got["2014"][0] == got["2017"][0]  # file order (images, annotations) does not matter
    assert ids(got["2014"][1]) == ids(got["2017"][1])
    prompts, sources = got["2014"]
    assert sorted(ids(sources)) == CAPTIONED  # first: each captioned image once
    assert prompts == [clean(CAPTIONS[s["coco_image_id"]][0]) for s in sources]
    for layout, (_, sources) in got.items():
        for s in sources:
            stem = f"{s['coco_image_id']:012d}.jpg"
            want = f"COCO_val2014_{stem}" if layout == "2014" else stem
            assert s["coco_file_name"] == want
            assert s["coco_url"] == f"http://images.cocodataset.org/val{layout}/{want}"


def test_the_three_modes(coco_files):
    path = coco_files["2017"]
    first_prompts, first = load_prompts(path, 4, seed=5)
    every_prompts, every = load_prompts(path, 9, seed=5, coco_captions="all")
    pairs = sorted(zip(ids(every), every_prompts, strict=True))
    assert pairs == sorted((i, clean(c)) for i, caps in CAPTIONS.items() for c in caps)
    assert "A woman marking a cake with the back of a knife." in every_prompts  # whitespace
    picked = set()
    for seed in range(8):
        prompts, sources = load_prompts(path, 4, seed=seed, coco_captions="random")
        assert (prompts, sources) == load_prompts(path, 4, seed=seed, coco_captions="random")
        # the same images in the same order as 'first': only the captions differ
        assert ids(sources) == ids(load_prompts(path, 4, seed=seed)[1])
        assert all(
            clean(c) in map(clean, CAPTIONS[i]) for c, i in zip(prompts, ids(sources), strict=True)
        )
        picked |= set(zip(ids(sources), prompts, strict=True))
    assert len(picked) > len(CAPTIONED)  # not always the first caption
    assert first_prompts == [clean(CAPTIONS[i][0]) for i in ids(first)]


@pytest.mark.parametrize("mode", ["first", "all"])
def test_seeded_order_and_first_n(coco_files, mode):
    path = coco_files["2014"]
    total = 4 if mode == "first" else 9
    full = load_prompts(path, total, seed=1, coco_captions=mode)
    for n in range(1, total + 1):  # what a shard job computes (images up to its own last one)
        prompts, sources = load_prompts(path, n, seed=1, coco_captions=mode)
        assert (prompts, sources) == (full[0][:n], full[1][:n])
    orders = {tuple(load_prompts(path, total, seed=s, coco_captions=mode)[0]) for s in range(6)}
    assert len(orders) > 1  # the seed shuffles
    with pytest.raises(UserError, match=rf"{total + 1} images asked for, but --coco-captions "
                       rf"{mode} gives {total} prompts") as err:  # fmt: skip
        load_prompts(path, total + 1, seed=1, coco_captions=mode)
    assert str(path) in str(err.value)


def test_text_prompt_files_stay_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("{a curly} prompt\n\nplain prompt\n")
    assert load_prompts(path, 5, shuffle=True, seed=2) == (
        expand_prompts(["{a curly} prompt", "plain prompt"], 5, True, 2),
        [],
    )
    # Recognised by content, not by name.
    write_coco(tmp_path / "captions.txt", coco_data("2017"))
    assert sorted(ids(load_prompts(tmp_path / "captions.txt", 4)[1])) == CAPTIONED


def _drop(key):
    return lambda d: d.pop(key)


MALFORMED = {
    "truncated": (None, "not valid JSON"),
    "not-an-object": (lambda d: d.clear() or d.update(x=[1]), "not a COCO captions file"),
    "no-images": (_drop("images"), "'images' is missing or not a list"),
    "image-without-id": (lambda d: d["images"][1].pop("id"), r"images\[1\] has no integer 'id'"),
    "no-caption": (lambda d: d["annotations"][2].pop("caption"), r"annotations\[2\] has no caption"),
    "empty-caption": (lambda d: d["annotations"][0].update(caption="  "), r"annotations\[0\] has"),
    "unknown-image": (lambda d: d["annotations"][3].update(image_id=1), "image_id 1, which is not"),
    "instances": (lambda d: [a.update(bbox=[0, 0, 1, 1], category_id=1) or a.pop("caption")
                             for a in d["annotations"]], "instances or keypoints"),
    "other-type": (lambda d: d.update(type="instances"), "a COCO 'instances' file"),
    "no-annotations": (lambda d: d.update(annotations=[]), "no annotations"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_is_one_line(tmp_path, case, capsys):
    edit, message = MALFORMED[case]
    path = tmp_path / "captions_val2017.json"
    data = coco_data("2017")
    if edit is None:
        path.write_text(json.dumps(data)[:200])
    else:
        edit(data)
        write_coco(path, data)
    with pytest.raises(UserError, match=message) as err:
        load_prompts(path, 2)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    if case == "truncated":  # and the command prints it as its one error line
        with pytest.raises(SystemExit):
            main(["--prompt-file", str(path), "--output-dir", str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: {err.value}"]


# ---------------------------------------------------------------------- generating from COCO


def _args(tiny_dir, out, coco, *extra) -> list[str]:
    return ["--pretrained-model", str(tiny_dir), "--prompt-file", str(coco), "--num-images", "3",
            "--image-size", "64", "--num-inference-steps", "1", "--device", "cpu", "--seed", "3",
            "--output-dir", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def coco_run(tiny_dir, coco_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco-run") / "dataset"
    assert main(_args(tiny_dir, out, coco_files["2017"])) == 0
    return out


def test_generated_dataset_keeps_the_source_image_ids(coco_run, coco_files):
    from pycocotools.coco import COCO

    prompts, sources = load_prompts(coco_files["2017"], 3, seed=3)
    coco = COCO(str(coco_run / "captions.json"))
    assert sorted(coco.getImgIds()) == [0, 1, 2]
    for index in range(3):
        image = coco.loadImgs(index)[0]
        assert {k: image[k] for k in sources[index]} == sources[index]
        caption = coco.loadAnns(coco.getAnnIds(imgIds=index))[0]["caption"]
        assert caption == prompts[index]
        with Image.open(coco_run / image["file_name"]) as im:
            meta = json.loads(im.text["sdxl"])
        assert meta["coco_image_id"] == sources[index]["coco_image_id"]
        assert meta["prompt"] == prompts[index]
    dataset = json.loads((coco_run / "captions.json").read_text())
    info = dataset["info"]
    newest = max((coco_run / f"{i:05d}.png").stat().st_mtime for i in range(3))
    assert (
        info["date_created"]
        == datetime.datetime.fromtimestamp(newest, datetime.UTC).date().isoformat()
    )
    assert info["year"] == int(info["date_created"][:4]) and info["version"]
    assert info["contributor"] == "sdxl-pipeline" and "url" in info
    assert f"model fingerprint {meta['model_id']}" in info["description"]
    assert "COCO captions" in info["description"]
    assert [lic["url"] for lic in dataset["licenses"]] == [
        "https://creativecommons.org/licenses/by/4.0/"
    ]


def test_text_prompts_claim_no_license():
    from sdxl.generate.coco import coco_captions

    record = {"index": 0, "file_name": "00000.png", "width": 64, "height": 64, "prompt": "a cat",
              "model_id": "abc", "loras": [{"file": "l.safetensors", "scale": 0.5, "sha256": "f00d"}]}  # fmt: skip
    out = coco_captions([record], "generated by m", "2026-01-02")
    assert out["licenses"] == [] and "coco_image_id" not in out["images"][0]
    assert out["info"]["description"] == (
        "generated by m; model fingerprint abc; LoRA l.safetensors (sha256 f00d, scale 0.5)"
    )
    assert out["info"]["date_created"] == "2026-01-02" and out["info"]["year"] == 2026


def test_rerun_remakes_exactly_the_changed_prompts(
    coco_run, coco_files, tiny_dir, tmp_path, capsys
):
    same = tmp_path / "same"
    shutil.copytree(coco_run, same)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in same.iterdir()
              if not p.name.startswith(".")}  # fmt: skip
    assert main(_args(tiny_dir, same, coco_files["2017"])) == 0
    assert capsys.readouterr().out.startswith("0 new images")
    # Every file the same (captions.json too: its date is the newest image's), images untouched.
    assert {n: (same / n).read_bytes() for n in before} == {n: b for n, (_, b) in before.items()}
    images = [n for n in before if n.endswith(".png") and n[0].isdigit()]
    assert {n: (same / n).stat().st_mtime_ns for n in images} == {n: before[n][0] for n in images}
    # 'random' keeps the same COCO images in the same order: only images whose caption
    # changed are made again.
    first = load_prompts(coco_files["2017"], 3, seed=3)[0]
    chosen = load_prompts(coco_files["2017"], 3, seed=3, coco_captions="random")[0]
    changed = [i for i in range(3) if first[i] != chosen[i]]
    assert 0 < len(changed) < 3  # some kept, some made again
    edited = tmp_path / "edited"
    shutil.copytree(coco_run, edited)
    assert main(_args(tiny_dir, edited, coco_files["2017"], "--coco-captions", "random")) == 0
    assert capsys.readouterr().out.startswith(f"{len(changed)} new images")
    for i in range(3):
        png = f"{i:05d}.png"
        assert ((edited / png).stat().st_mtime_ns != before[png][0]) == (i in changed)
    captions = json.loads((edited / "captions.json").read_text())["annotations"]
    assert [a["caption"] for a in captions] == chosen


# ------------------------------------------------------------------------------- the pipeline


@pytest.fixture
def workflow_common():
    """The generate/assemble jobs' config helper (workflow_scripts/generation.py)."""
    sys.path.insert(0, str(ROOT / "workflow_scripts"))
    try:
        import generation
    finally:
        sys.path.remove(str(ROOT / "workflow_scripts"))
    return generation


def lora_file(base_state, path: Path) -> Path:
    import torch

    from sdxl.lora import LoRAConfig, inject_lora, lora_state_dict
    from sdxl.lora_formats.kohya import save_kohya
    from sdxl.models.configs import TINY, UNetConfig
    from sdxl.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"]))
    unet.load_state_dict(base_state)
    inject_lora(unet, LoRAConfig(rank=2, alpha=2.0), generator=torch.Generator().manual_seed(0))
    save_kohya(path, lora_state_dict(unet))
    return path


def test_pipeline_config_reaches_the_generated_dataset(
    coco_files, tiny_dir, base_state, tmp_path, workflow_common
):
    from pycocotools.coco import COCO

    from sdxl.generate.assemble import assemble_dataset
    from sdxl.generate.run import generate_indices
    from sdxl.generate.shard_marker import write_shard_marker
    from sdxl.workflow_config import ConfigError, check_config

    schema = ROOT / "schemas/config.schema.yaml"
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert config["generate"]["coco_captions"] == "first"  # documented with the default
    with pytest.raises(ConfigError, match="coco_captions"):
        bad = copy.deepcopy(config)
        bad["generate"]["coco_captions"] = "every"
        check_config(bad, schema)
    config["generate"].update(prompts_file=str(coco_files["2014"]), coco_captions="all",
                              num_images=3, width=64, height=64, num_inference_steps=1)  # fmt: skip
    check_config(config, schema)
    settings = generation_settings(config)
    assert settings["coco_captions"] == "all"  # recorded: a change reruns the generate jobs
    inputs = SimpleNamespace(prompts=coco_files["2014"], model=tiny_dir,
                             lora=lora_file(base_state, tmp_path / "lora_final.safetensors"))  # fmt: skip
    want = load_prompts(coco_files["2014"], 3, seed=config["generate"]["seed"], coco_captions="all")
    markers = []
    for shard, (start, stop) in enumerate([(0, 2), (2, 3)]):  # as rules/generate.smk splits them
        out = tmp_path / f"generate/shard-{shard}"
        cfg = workflow_common.generation_config(settings, inputs, out, stop, 5)
        assert cfg.coco_captions == "all" and list(cfg.prompts) == want[0][:stop]
        generate_indices(cfg, list(range(start, stop)))
        markers.append(tmp_path / f"generate/shard-{shard}.json")
        write_shard_marker(markers[-1], cfg, range(start, stop), made=stop - start, seconds=1.0,
                           device="cpu", peak_mem_gb=None)  # fmt: skip
    dataset = tmp_path / "dataset"
    cfg = workflow_common.generation_config(settings, inputs, dataset, 3, 5)
    assemble_dataset(cfg, markers, dataset)
    coco = COCO(str(dataset / "captions.json"))
    assert [coco.loadImgs(i)[0]["coco_image_id"] for i in range(3)] == ids(want[1])
    assert [coco.loadAnns(coco.getAnnIds(imgIds=i))[0]["caption"] for i in range(3)] == want[0]
    sha = cfg.identity["loras"][0]["sha256"]
    assert (
        f"LoRA lora_final.safetensors (sha256 {sha}, scale 1)"
        in coco.dataset["info"]["description"]
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", coco.dataset["info"]["date_created"])
