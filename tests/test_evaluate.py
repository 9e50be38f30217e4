"""Evaluation: our Inception, FID, KID and CLIP score against torch-fidelity and torchmetrics."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.cli.evaluate import main as evaluate_main
from sdxl.errors import UserError
from sdxl.evaluate.clip import TINY_CLIP, load_clip
from sdxl.evaluate.features import (
    FeatureConfig,
    dataset_items,
    extract_features,
    feature_metadata,
    image_files,
    merge_features,
    read_uint8,
    save_features,
)
from sdxl.evaluate.inception import (
    TINY_INCEPTION,
    InceptionConfig,
    load_inception,
    random_state_dict,
    tf1_bilinear,
)
from sdxl.evaluate.metrics import clip_score, fid, kid
from sdxl.evaluate.run import compute_metrics, marker_items
from sdxl.report.evaluation import evaluation_page

PROMPTS = ["a red circle", "a blue square on a white background", "a green triangle",
           "a yellow star at night", "a dog on the beach", "a small orange house"]  # fmt: skip
TINY = FeatureConfig(inception=TINY_INCEPTION, clip_model=TINY_CLIP, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """The tiny CLIP is written into a private cache for this module."""
    old = os.environ.get("SDXL_CACHE_DIR")
    os.environ["SDXL_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdxl-cache"))
    yield
    if old is None:
        os.environ.pop("SDXL_CACHE_DIR")
    else:
        os.environ["SDXL_CACHE_DIR"] = old


def _image(rng: np.random.Generator, w: int, h: int, bright: int) -> Image.Image:
    pixels = rng.integers(0, 256 - bright, (h, w, 3)) + bright
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)  # a coloured block
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A generated COCO-style dataset (6 images, captions.json) and a reference folder (5)."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    gen, ref = root / "generated", root / "reference" / "sub"
    gen.mkdir()
    ref.mkdir(parents=True)
    images, annotations = [], []
    for i, prompt in enumerate(PROMPTS):
        _image(rng, 64, 64, 0).save(gen / f"{i:05d}.png")
        images.append({"id": i, "file_name": f"{i:05d}.png", "width": 64, "height": 64})
        annotations.append({"id": i, "image_id": i, "caption": prompt})
    (gen / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    for i in range(5):  # other sizes and formats: the resize to 299 takes any
        _image(rng, 48 + 8 * i, 40, 60).convert("RGB").save(ref / f"real{i}.jpg", quality=95)
    return gen, root / "reference"


@pytest.fixture(scope="module")
def features(folders):
    gen, ref = folders
    files, prompts = dataset_items(gen)
    fake = extract_features(files, prompts, TINY)
    real = extract_features(image_files(ref), None, TINY)
    return fake, real


def test_tf1_resize_matches_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as reference,
    )

    gen = torch.Generator().manual_seed(0)
    for h, w in [(37, 53), (340, 311), (299, 299)]:  # up, down, same
        x = torch.randint(0, 256, (2, 3, h, w), generator=gen).float()
        want = reference(x, size=(299, 299), align_corners=False)
        assert torch.equal(tf1_bilinear(x, 299, 299), want)


def test_inception_matches_torch_fidelity(tmp_path):
    """Random weights in torch-fidelity's layout: its strict load accepts our file and its
    FeatureExtractorInceptionV3 gives our 2048-d features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path / "weights-inception-random.pth"
    torch.save(random_state_dict(InceptionConfig(), seed=3), path)
    theirs = FeatureExtractorInceptionV3("inception", ["2048"], feature_extractor_weights_path=path)
    ours = load_inception(str(path))
    images = torch.randint(0, 256, (2, 3, 80, 64), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)  # fmt: skip
    with torch.inference_mode():
        want, got = theirs(images)[0], ours(images)
    assert got.shape == (2, 2048) and got.std(0).mean() > 1e-3  # features differ per image
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Lookup(torch.nn.Module):
    """torchmetrics' feature extractor: image indices -> our precomputed features."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.num_features = table.double(), table.shape[1]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


def test_fid_kid_match_torchmetrics(features):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = features[0]["inception"], features[1]["inception"]
    table = torch.cat([real, fake])
    real_idx, fake_idx = torch.arange(len(real)), torch.arange(len(real), len(table))
    metric = FrechetInceptionDistance(feature=Lookup(table))
    metric.update(real_idx, real=True)
    metric.update(fake_idx, real=False)
    ours = fid(real, fake)
    assert ours > 0
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)
    assert fid(real, real) == pytest.approx(0, abs=1e-6 * ours)

    for subsets, size, seed in [(7, 3, 11), (1, 5, 0)]:  # random subsets; all of the reference
        metric = KernelInceptionDistance(feature=Lookup(table), subsets=subsets, subset_size=size)
        metric.update(real_idx, real=True)
        metric.update(fake_idx, real=False)
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
        want_mean, want_std = metric.compute()
        mean, std, used = kid(real, fake, subsets, size, seed=seed)
        assert used == size
        assert mean == pytest.approx(float(want_mean), rel=1e-9)
        assert std == pytest.approx(float(want_std), rel=1e-9, abs=1e-12)


class TensorOutputs(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors (transformers 4.x)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_matches_torchmetrics(folders, features):
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(TINY_CLIP)
    metric = CLIPScore(model_name_or_path=lambda: (TensorOutputs(model), processor))
    files, prompts = dataset_items(folders[0])
    metric.update([read_uint8(f) for f in files], prompts)
    fake = features[0]
    assert fake["clip_image"].shape == fake["clip_text"].shape == (6, 16)
    ours = clip_score(fake["clip_image"], fake["clip_text"])
    assert ours > 0
    assert ours == pytest.approx(float(metric.compute()), abs=1e-4)
    shuffled = clip_score(fake["clip_image"], fake["clip_text"].roll(1, 0))
    assert shuffled != pytest.approx(ours, abs=1e-3)  # the pairing matters


def test_shards_merge_to_the_one_shot_features(folders, features, tmp_path):
    files, prompts = dataset_items(folders[0])
    paths = []
    for k, part in enumerate([slice(0, 4), slice(4, 6)]):
        shard = extract_features(files[part], prompts[part], TINY)
        paths.append(tmp_path / f"shard-{k}.safetensors")
        save_features(paths[-1], shard, feature_metadata(TINY, len(files[part]), "gen"))
    merged, meta = merge_features(paths)
    assert meta["n_images"] == "6" and meta["inception"] == TINY_INCEPTION
    for key, value in features[0].items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    other = FeatureConfig(inception="other.pth", clip_model=TINY_CLIP)
    save_features(paths[1], merged, feature_metadata(other, 6, "gen"))
    with pytest.raises(UserError, match="inception"):
        merge_features(paths)


def test_cli_writes_metrics_json(folders, features, tmp_path, capsys):
    gen, ref = folders
    out = tmp_path / "metrics.json"
    args = ["--images", str(gen), "--reference", str(ref), "--inception", TINY_INCEPTION,
            "--clip-model", TINY_CLIP, "--device", "cpu", "--batch-size", "3",
            "--kid-subsets", "4", "--kid-subset-size", "3", "--output", str(out)]  # fmt: skip
    assert evaluate_main(args) == 0
    metrics = json.loads(out.read_text())
    fake, real = features
    want = compute_metrics(fake, feature_metadata(TINY, 6, str(gen)), real,
                           feature_metadata(TINY, 5, str(ref)), 4, 3)  # fmt: skip
    assert metrics["n_images"] == 6 and metrics["images"] == str(gen)
    assert metrics["reference"] == {"source": str(ref), "n_images": 5}
    assert metrics["inception"]["model"] == TINY_INCEPTION and metrics["clip_model"] == TINY_CLIP
    assert metrics["inception"]["features"] == real["inception"].shape[1] == 256
    for key in ("fid", "kid_mean", "kid_std", "clip_score"):
        assert metrics[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), key
    assert metrics["kid_subset_size"] == 3 and metrics["kid_subsets"] == 4


def test_cli_bad_input_is_one_error_line(folders, tmp_path, capsys):
    gen, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    for images, reference, what in [(tmp_path / "missing", gen, "no such image folder"),
                                    (gen, empty, "holds no images")]:  # fmt: skip
        args = ["--images", str(images), "--reference", str(reference), "--inception",
                TINY_INCEPTION, "--clip-model", "none", "--output", str(tmp_path / "m.json")]  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            evaluate_main(args)
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and what in err[0]
    assert not (tmp_path / "m.json").exists()


def test_the_workflow_lists_the_reference_images_the_jobs_read(tmp_path):
    """The rules slice the list the evaluate_reference jobs read, in the same order (names that
    sort differently as strings and as paths too), and a folder named like an image is none."""
    from sdxl.evaluate.run import reference_items
    from sdxl.workflow_inputs import reference_dir_files

    for name in ("a b/1.png", "a/1.png", "a/2.JPG", "c.webp", "notes.txt", "d.png/x.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = reference_dir_files({"evaluate": {"reference_dir": str(tmp_path)}})
    assert listed == [str(p) for p in reference_items(str(tmp_path), "")]
    assert [os.path.relpath(p, tmp_path) for p in listed] == [
        "a/1.png", "a/2.JPG", "a b/1.png", "c.webp", "d.png/x.bmp"]  # fmt: skip


def test_library_never_imports_the_metric_libraries():
    """torchmetrics and torch-fidelity are the tests' reference only."""
    pattern = re.compile(r"^\s*(?:import|from)\s+(?:torchmetrics|torch_fidelity)\b", re.MULTILINE)
    for path in (Path(__file__).resolve().parents[1] / "sdxl").rglob("*.py"):
        assert pattern.search(path.read_text()) is None, path


def test_generate_shard_prompts_come_from_sidecars_or_the_png(tmp_path):
    """A generate shard's marker lists its images; prompts from .txt, else the PNG's record."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl", json.dumps({"prompt": "a recorded prompt", "seed": 1}))
    Image.new("RGB", (8, 8)).save(tmp_path / "00000.png", pnginfo=info)
    Image.new("RGB", (8, 8)).save(tmp_path / "00001.png")
    (tmp_path / "00001.txt").write_text("a sidecar caption\n")
    marker = tmp_path / "shard-0.json"
    marker.write_text(json.dumps({"folder": str(tmp_path), "files": ["00000.png", "00001.png"]}))
    files, prompts = marker_items(marker)
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert prompts == ["a recorded prompt", "a sidecar caption"]
    (tmp_path / "00001.txt").unlink()
    with pytest.raises(UserError, match="00001.png: no prompt"):
        marker_items(marker)


def test_evaluation_page_names_everything_escaped(features):
    fake, real = features
    hostile = "refs/<img src=x onerror=alert(1)>"
    metrics = compute_metrics(fake, feature_metadata(TINY, 6, "gen"), real,
                              feature_metadata(TINY, 5, hostile), 4, 3)  # fmt: skip
    html = evaluation_page(json.loads(json.dumps(metrics)))
    assert "<img" not in html and "&lt;img src=x" in html
    for text in (TINY_INCEPTION, TINY_CLIP, "FID", "KID", "CLIP score", f"{metrics['fid']:.6g}"):
        assert text in html, text
    assert "Evaluation is off" in evaluation_page(None)


def test_missing_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    from sdxl.evaluate.clip import clip_folder

    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path))

    def offline(url, dst, progress=True):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=r"weights-inception-2015-12-05-6726825d.pth"):
        load_inception("default")
    with pytest.raises(UserError, match="no such weights file"):
        load_inception(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="not a Hub repo id"):
        clip_folder(str(tmp_path / "no-such-clip"))
