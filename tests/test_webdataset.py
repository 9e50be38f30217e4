"""--output-format webdataset: tars that webdataset and Hugging Face datasets read as the folder,
kept on a rerun, rewritten when damaged or when the settings change; and the pipeline's rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sdxl.generate.dataset import generate_dataset
from sdxl.generate.run import GenerateConfig
from sdxl.generate.webdataset import WEBDATASET_DIR

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle", "a blue square, small", 'a "green" star', "a yellow heart", "a ring")
TARS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def _cfg(tiny_dir, out, **kw) -> GenerateConfig:
    base = dict(pretrained_model=str(tiny_dir), output_dir=str(out), prompts=PROMPTS, width=64,
                height=64, num_inference_steps=1, guidance_scale=5.0, seed=3, device="cpu",
                output_format="webdataset", webdataset_shard_size=2)  # fmt: skip
    return GenerateConfig(**{**base, **kw})


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def made(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "data"
    assert generate_dataset(_cfg(tiny_dir, out), num_workers=1) == len(PROMPTS)
    return out


def _folder(out: Path) -> dict[str, tuple[np.ndarray, str, dict]]:
    """key -> (pixels, prompt, metadata) of the dataset folder."""
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return {r["file_name"][:-4]: (np.asarray(Image.open(out / r["file_name"])),
                                  (out / f"{r['file_name'][:-4]}.txt").read_text(), r)
            for r in records}  # fmt: skip


def test_tars_hold_the_folder(made):
    wds_dir = made / WEBDATASET_DIR
    assert sorted(p.name for p in wds_dir.iterdir()) == [*TARS, "shards.json"]
    index = json.loads((wds_dir / "shards.json").read_text())
    assert index["samples"] == 5 and [s["samples"] for s in index["shards"]] == [2, 2, 1]
    with tarfile.open(wds_dir / TARS[0]) as tar:
        assert tar.getnames() == [
            f"0000{i}.{ext}" for i in (0, 1) for ext in ("png", "txt", "json")
        ]
    assert (made / "captions.json").is_file() and (made / "00000.txt").is_file()


def test_webdataset_library_reads_the_folder(made):
    import webdataset as wds

    urls = [str(made / WEBDATASET_DIR / name) for name in TARS]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    want = _folder(made)
    assert [s["__key__"] for s in samples] == list(want) == ["00000", "00001", "00002", "00003",
                                                             "00004"]  # fmt: skip
    for s in samples:
        pixels, prompt, meta = want[s["__key__"]]
        assert np.array_equal(np.asarray(s["png"]), pixels)
        assert s["txt"] == prompt and s["json"] == meta
    assert [s["txt"] for s in samples] == list(PROMPTS)


def test_hugging_face_datasets_reads_the_folder(made, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    files = sorted(str(p) for p in (made / WEBDATASET_DIR).glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf"))  # fmt: skip
    want = _folder(made)
    assert ds["__key__"] == list(want)
    for row in ds:
        pixels, prompt, meta = want[row["__key__"]]
        assert np.array_equal(np.asarray(row["png"]), pixels)
        assert row["txt"] == prompt
        assert {k: row["json"][k] for k in meta} == meta


def test_rerun_keeps_tars_and_damaged_or_changed_ones_are_rewritten(tiny_dir, made, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(made, out)  # mtimes kept (copy2)
    wds_dir = out / WEBDATASET_DIR
    before = _mtimes(wds_dir)
    assert generate_dataset(_cfg(tiny_dir, out), num_workers=1) == 0
    assert _mtimes(wds_dir) == before  # nothing rewritten
    first = wds_dir / TARS[0]
    fresh_bytes = first.read_bytes()
    # cut short (before its end-of-archive blocks: every member still reads), inside a member, a
    # damaged header, not a tar: each is written again
    with tarfile.open(first) as tar:
        last = tar.getmembers()[-1]
    padded = -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    (wds_dir / TARS[0]).write_bytes(fresh_bytes[: last.offset_data + padded])
    (wds_dir / TARS[2]).write_bytes((wds_dir / TARS[2]).read_bytes()[:5000])
    second = (wds_dir / TARS[1]).read_bytes()
    (wds_dir / TARS[1]).write_bytes(b"\xff" * 600 + second[600:])
    (wds_dir / "shard-000009.tar").write_bytes(b"from a run with more images")
    damaged = _mtimes(wds_dir)
    generate_dataset(_cfg(tiny_dir, out), num_workers=1)
    assert list(_mtimes(wds_dir)) == TARS
    assert all(_mtimes(wds_dir)[name] != damaged[name] for name in TARS)
    assert first.read_bytes() == fresh_bytes  # same images, same bytes
    assert (wds_dir / TARS[1]).read_bytes() == second
    (wds_dir / TARS[2]).write_bytes(b"not a tar")
    generate_dataset(_cfg(tiny_dir, out), num_workers=1)
    with tarfile.open(wds_dir / TARS[2]) as tar:
        assert tar.getnames() == ["00004.png", "00004.txt", "00004.json"]
    # Another shard size repacks; another seed remakes the images and so the tars.
    generate_dataset(_cfg(tiny_dir, out, webdataset_shard_size=3), num_workers=1)
    assert list(_mtimes(wds_dir)) == TARS[:2]
    with tarfile.open(wds_dir / TARS[1]) as tar:
        assert tar.getnames()[0] == "00003.png"
    kept = _mtimes(wds_dir)
    generate_dataset(_cfg(tiny_dir, out, webdataset_shard_size=3, seed=4), num_workers=1)
    assert all(_mtimes(wds_dir)[name] != kept[name] for name in kept)
    with tarfile.open(wds_dir / TARS[0]) as tar:
        assert json.load(tar.extractfile("00000.json"))["seed"] == 4
    # Back to the plain folder: the tars go, the images stay.
    assert generate_dataset(_cfg(tiny_dir, out, seed=4, output_format="coco"), 1) == 0
    assert not wds_dir.exists()


def test_cli_flags(tiny_dir):
    from sdxl.cli.generate import build_parser, config_from_args

    args = build_parser().parse_args(["--pretrained-model", str(tiny_dir), "--prompt", "a cat",
                                      "--output-format", "webdataset", "--shard-size", "7"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.output_format, cfg.webdataset_shard_size) == ("webdataset", 7)
    with pytest.raises(ValueError, match="--shard-size"):
        _cfg(tiny_dir, "x", webdataset_shard_size=0)


# ------------------------------------------------------------------------------- the pipeline


def _config(**generate) -> dict:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["generate"].update(generate)
    return config


def test_pipeline_config_keys_validate():
    from sdxl.workflow_config import ConfigError, check_config
    from sdxl.workflow_inputs import generation_settings

    schema = ROOT / "schemas/config.schema.yaml"
    check_config(_config(output_format="webdataset", webdataset_shard_size=2), schema)
    for bad in ({"output_format": "tar"}, {"webdataset_shard_size": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            check_config(_config(**bad), schema)
    # Packing settings are not generation settings: changing them reruns no generate job.
    settings = generation_settings(_config(output_format="webdataset"))
    assert "output_format" not in settings and "webdataset_shard_size" not in settings


def test_pipeline_rule_packs_the_assembled_dataset(made, tmp_path):
    """rule pack_webdataset, run by snakemake on an assembled dataset (the upstream rules are
    not allowed to run: their outputs are taken as given), and the default target wants it."""
    work = tmp_path / "work"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    work.mkdir()
    for name in ("Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
                 "profiles", "report", "sdxl", "examples"):  # fmt: skip
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, work / name)
    dataset = work / "results/dataset"
    shutil.copytree(made, dataset, ignore=shutil.ignore_patterns(WEBDATASET_DIR, ".lock"))
    (work / "wds.yaml").write_text(yaml.safe_dump({"generate": {"output_format": "webdataset",
                                                                "webdataset_shard_size": 3}}))  # fmt: skip
    env = {**os.environ, "SDXL_GPUS": "", "PYTHONPATH": ""}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    configs = ["--cores", "1", "--configfiles", "profiles/demo/demo-config.yaml", "wds.yaml"]
    dry = subprocess.run([snakemake, "-n", "--quiet", "rules", *configs], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "pack_webdataset" in dry.stdout + dry.stderr
    target = "results/dataset/webdataset/shards.json"  # targets first: options take lists
    run = subprocess.run([snakemake, target, "--allowed-rules", "pack_webdataset", *configs],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    index = json.loads((dataset / "webdataset/shards.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 2]
    with tarfile.open(dataset / "webdataset" / TARS[1]) as tar:
        assert tar.extractfile("00004.txt").read().decode() == PROMPTS[4]
