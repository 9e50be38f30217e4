"""Dataset scan + validation, manifests, aspect buckets, transforms and the example dataset."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.data import (
    DatasetError,
    Item,
    assign_bucket,
    batch_by_bucket,
    load_image,
    make_buckets,
    read_manifest,
    scan_dataset,
    transform_image,
    validate_dataset,
    write_manifest,
    write_problems,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _noise_image(size, seed=0, mode="RGB") -> Image.Image:
    """A random picture: distinct seeds never collide as duplicates."""
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode, 1)
    data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode)


def _pair(root: Path, name: str, caption: str | bytes | None = "a photo", size=(64, 64), seed=0):
    """Write an image (format from the name) and, unless None, its caption."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _noise_image(size, seed).save(path)
    if caption is not None:
        data = caption if isinstance(caption, bytes) else caption.encode()
        path.with_suffix(".txt").write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Scanning and decoding


def test_scan_any_case_extensions_nested_sorted_and_hidden_ignored(tmp_path):
    for i, name in enumerate(["b.JPG", "a.Png", "sub/deep/c.jpeg", "sub/d.WEBP", "e.webp"]):
        _pair(tmp_path, name, seed=i)
    _pair(tmp_path, ".hidden.png", seed=10)
    _pair(tmp_path, ".cache/x.png", seed=11)
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "f.gif").write_bytes(b"GIF89a")
    images, captions = scan_dataset(tmp_path)
    expected = ["a.Png", "b.JPG", "e.webp", "sub/d.WEBP", "sub/deep/c.jpeg"]
    assert [p.as_posix() for p in images] == expected
    assert [p.as_posix() for p in captions] == [
        "a.txt",
        "b.txt",
        "e.txt",
        "sub/d.txt",
        "sub/deep/c.txt",
    ]
    result = validate_dataset(tmp_path, min_size=32)
    assert [item.key for item in result.items] == expected
    assert result.problems == ()
    assert result.items[3].path == str(tmp_path / "sub/d.WEBP")


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide x 20 high, left half red and right half blue; orientation 6 = rotate 90 clockwise.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=95)
    (tmp_path / "rot.txt").write_text("rotated")

    upright = load_image(path)
    assert upright.size == (20, 40)  # (W, H) after rotation
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60
    (item,) = validate_dataset(tmp_path, min_size=16).items
    assert (item.width, item.height) == (20, 40)
    _, cond = transform_image(upright, (64, 64))
    assert cond.original_size == (40, 20)


def _save_mode(path: Path, mode: str) -> None:
    """A 2x1 image: left pixel opaque red-ish, right pixel fully transparent where possible."""
    if mode == "RGBA":
        Image.frombytes("RGBA", (2, 1), bytes([255, 0, 0, 255, 0, 0, 0, 0])).save(path)
    elif mode == "LA":
        Image.frombytes("LA", (2, 1), bytes([0, 255, 0, 0])).save(path)
    elif mode == "P":
        image = Image.new("P", (2, 1))
        image.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        image.putdata([0, 1])
        image.save(path, transparency=1)
    elif mode == "L":
        Image.frombytes("L", (2, 1), bytes([0, 255])).save(path)
    elif mode == "I;16":
        Image.fromarray(np.array([[0, 65535]], np.uint16)).save(path)
    elif mode == "CMYK":
        Image.new("CMYK", (2, 1), (0, 255, 255, 0)).save(path, quality=100)


@pytest.mark.parametrize(
    "mode, suffix, left, right",
    [
        ("RGBA", ".png", (255, 0, 0), (255, 255, 255)),
        ("LA", ".png", (0, 0, 0), (255, 255, 255)),
        ("P", ".png", (255, 0, 0), (255, 255, 255)),
        ("L", ".png", (0, 0, 0), (255, 255, 255)),
        ("I;16", ".png", (0, 0, 0), (255, 255, 255)),
        ("CMYK", ".jpg", (255, 0, 0), (255, 0, 0)),
    ],
)
def test_modes_become_rgb_with_transparency_on_white(tmp_path, mode, suffix, left, right):
    path = tmp_path / f"img{suffix}"
    _save_mode(path, mode)
    image = load_image(path)
    assert image.mode == "RGB"
    got = np.asarray(image).astype(int)
    np.testing.assert_allclose(got[0, 0], left, atol=8)
    np.testing.assert_allclose(got[0, 1], right, atol=8)


# ---------------------------------------------------------------------------------------------
# Validation


class _WordTokenizer:
    """Stand-in for a CLIP tokenizer: one id per word plus start/end."""

    def __call__(self, text):
        return {"input_ids": [0] + [1] * len(text.split()) + [2]}


def _broken_dataset(root: Path) -> dict[str, str]:
    """One file per problem kind, plus good items; returns {file: kind}."""
    _pair(root, "good1.png", "a red square", size=(64, 64), seed=1)
    _pair(root, "good2.jpg", "\ufeffa blue  circle\n\n", size=(80, 64), seed=2)  # BOM + spaces
    _pair(root, "sub/good3.webp", "a green star", size=(64, 96), seed=3)
    _pair(root, "long.png", " ".join(["word"] * 80), seed=4)
    _pair(root, "nocap.png", None, seed=5)
    _pair(root, "empty.png", "  \n\t", seed=6)
    _pair(root, "latin1.png", "caf\xe9".encode("latin-1"), seed=7)
    _pair(root, "small.png", "tiny", size=(64, 20), seed=8)
    (root / "zcopy.png").write_bytes((root / "good1.png").read_bytes())
    (root / "zcopy.txt").write_text("a copy")
    full = root / "truncated.jpg"
    _noise_image((64, 64), 9).save(full, quality=95)
    full.write_bytes(full.read_bytes()[:600])
    (root / "truncated.txt").write_text("cut off")
    (root / "garbage.png").write_bytes(b"this is not a png at all")
    (root / "garbage.txt").write_text("garbage")
    (root / "orphan.txt").write_text("no image here")
    (root / "anim.txt").write_text("a gif")
    (root / "anim.gif").write_bytes(b"GIF89a")
    return {
        "nocap.png": "missing_caption",
        "empty.png": "empty_caption",
        "latin1.png": "unreadable_caption",
        "small.png": "too_small",
        "zcopy.png": "duplicate",
        "truncated.jpg": "undecodable_image",
        "garbage.png": "undecodable_image",
        "orphan.txt": "orphan_caption",
        "anim.txt": "orphan_caption",
        "long.png": "long_caption",
    }


def test_skip_reports_every_problem_kind(tmp_path, caplog):
    expected = _broken_dataset(tmp_path)
    caplog.set_level("WARNING")
    result = validate_dataset(tmp_path, min_size=32, tokenizer=_WordTokenizer())
    assert {p.file: p.kind for p in result.problems} == expected
    assert [i.key for i in result.items] == ["good1.png", "good2.jpg", "long.png", "sub/good3.webp"]
    by_file = {p.file: p for p in result.problems}
    assert "no caption file nocap.txt" in by_file["nocap.png"].reason
    assert "nocap.txt" in by_file["nocap.png"].fix
    assert "not UTF-8" in by_file["latin1.png"].reason
    assert "shorter side 20 < min_size 32" in by_file["small.png"].reason
    assert "same picture as good1.png" in by_file["zcopy.png"].reason
    assert "cannot decode" in by_file["truncated.jpg"].reason
    assert "anim.gif" in by_file["anim.txt"].fix  # points at the unsupported format
    assert "truncated at 77 tokens" in by_file["long.png"].reason
    assert "82 CLIP tokens" in by_file["long.png"].reason
    assert all(p.fix for p in result.problems)
    assert [p.file for p in result.problems if not p.dropped] == ["long.png"]
    assert len(result.errors) == 9 and len(result.warnings) == 1
    assert result.items[1].caption == "a blue circle"  # BOM dropped, whitespace collapsed
    assert (result.items[1].width, result.items[1].height) == (80, 64)
    assert "skipping nocap.png" in caplog.text
    # Without a tokenizer there is no length check.
    assert "long.png" not in {p.file for p in validate_dataset(tmp_path, min_size=32).problems}


def test_fail_raises_one_error_listing_the_problems(tmp_path):
    expected = _broken_dataset(tmp_path)
    with pytest.raises(DatasetError) as info:
        validate_dataset(tmp_path, min_size=32, policy="fail", tokenizer=_WordTokenizer())
    message = str(info.value)
    assert "9 problem(s) in 9 file(s)" in message
    for file, kind in expected.items():
        assert (file in message) == (kind != "long_caption"), file


def test_fail_lists_first_problems_and_counts_the_rest(tmp_path):
    _pair(tmp_path, "ok.png", "fine", seed=100)
    for i in range(25):
        _pair(tmp_path, f"n{i:02d}.png", None, seed=i)
    with pytest.raises(DatasetError, match=r"25 problem\(s\)") as info:
        validate_dataset(tmp_path, min_size=32, policy="fail")
    message = str(info.value)
    assert "n19.png" in message and "n20.png" not in message
    assert "... and 5 more" in message


def test_warnings_alone_do_not_fail(tmp_path):
    _pair(tmp_path, "long.png", " ".join(["word"] * 80))
    result = validate_dataset(tmp_path, min_size=32, policy="fail", tokenizer=_WordTokenizer())
    assert len(result.items) == 1 and [p.kind for p in result.problems] == ["long_caption"]


def test_real_clip_tokenizer_counts_start_and_end_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "r": 2, "e": 3, "d</w>": 4, "re": 5}
    vocab["red</w>"] = 6
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = transformers.CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77
    )
    data = tmp_path / "data"
    _pair(data, "ok.png", " ".join(["red"] * 75), seed=1)  # 75 + 2 = 77: fits
    _pair(data, "long.png", " ".join(["red"] * 76), seed=2)  # 78: cut
    result = validate_dataset(data, min_size=32, tokenizer=tokenizer)
    assert [(p.file, p.kind) for p in result.problems] == [("long.png", "long_caption")]
    assert "78 CLIP tokens" in result.problems[0].reason


def test_empty_and_missing_datasets_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        validate_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images found"):
        validate_dataset(tmp_path)
    _pair(tmp_path, "a.png", None)
    _pair(tmp_path, "b.png", "", seed=1)
    with pytest.raises(DatasetError, match="no usable items left; all 2 image") as info:
        validate_dataset(tmp_path, min_size=32)
    assert "a.png" in str(info.value) and "b.png" in str(info.value)
    with pytest.raises(ValueError, match="unknown policy"):
        validate_dataset(tmp_path, policy="ignore")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_round_trip(tmp_path, suffix):
    captions = ["NA", "null", "1.0", 'a "quoted", comma, caption', "café ☕ 東京", "  "]
    items = [
        Item(f"k{i}.png", f"/data/k{i}.png", caption, 64 + i, 32, "0" * 64)
        for i, caption in enumerate(captions)
    ]
    path = tmp_path / "out" / f"manifest{suffix}"
    write_manifest(items, path)
    assert read_manifest(path) == items
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        write_manifest(items, tmp_path / "manifest.parquet")


def test_manifest_and_problem_tables_from_a_validation(tmp_path):
    data = tmp_path / "data"
    _broken_dataset(data)
    result = validate_dataset(data, min_size=32)
    write_manifest(result, tmp_path / "manifest.csv")
    assert read_manifest(tmp_path / "manifest.csv") == list(result.items)
    write_problems(result, tmp_path / "problems.tsv", tmp_path / "problems.html")
    rows = (tmp_path / "problems.tsv").read_text().splitlines()
    assert rows[0] == "file\tkind\treason\tfix\tdropped"
    assert len(rows) == 1 + len(result.problems)
    page = (tmp_path / "problems.html").read_text()
    assert "<table" in page and "nocap.png" in page and "missing_caption" in page


# ---------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("image_size", [512, 1024, 256, 768])
def test_buckets_are_multiples_of_64_near_the_target_area(image_size):
    buckets = make_buckets(image_size)
    area = image_size**2
    assert (image_size, image_size) in buckets
    assert buckets == make_buckets(image_size)  # deterministic
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert area * (1 - 64 / image_size) <= w * h <= area
        assert max(w, h) / min(w, h) <= 4.0
        assert (h, w) in buckets
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)


def test_bucket_families_match_known_sizes():
    assert make_buckets(512) == [
        (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (768, 320), (1024, 256),
    ]  # fmt: skip
    sdxl = make_buckets(1024)
    for bucket in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (512, 2048)]:
        assert bucket in sdxl and bucket[::-1] in sdxl
    assert make_buckets(1024, max_aspect=2.0)[0] == (768, 1344)  # 704x1472 is 2.09
    with pytest.raises(ValueError, match="multiple of 64"):
        make_buckets(500)


def test_assign_bucket_picks_nearest_aspect():
    buckets = make_buckets(1024)
    assert assign_bucket(3000, 3000, buckets) == (1024, 1024)
    assert assign_bucket(6000, 4000, buckets) == (1216, 832)  # 1.5 -> 1.46
    assert assign_bucket(4000, 6000, buckets) == (832, 1216)
    assert assign_bucket(1920, 1080, buckets) == (1344, 768)  # 1.78 -> 1.75
    assert assign_bucket(10000, 100, buckets) == (2048, 512)  # clamps to the widest
    assert assign_bucket(50, 40, make_buckets(64)) == (64, 64)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, buckets)


def test_batch_by_bucket_is_homogeneous_complete_and_seeded():
    keys = [(512, 512)] * 7 + [(640, 384)] * 5 + [(384, 640)] * 2
    batches = batch_by_bucket(keys, 3, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len({keys[i] for i in b}) == 1 and len(b) <= 3 for b in batches)
    assert batches == batch_by_bucket(keys, 3, rng=random.Random(0))
    assert batches != batch_by_bucket(keys, 3, rng=random.Random(1))
    dropped = batch_by_bucket(keys, 3, rng=random.Random(0), drop_last=True)
    assert all(len(b) == 3 for b in dropped) and len(dropped) == 2 + 1


# ---------------------------------------------------------------------------------------------
# Transforms


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    """Light stand-in for torch.testing.assert_close, whose first call imports for seconds."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).abs().max().item()
    assert error <= atol, f"max abs error {error}"


def _columns_image(width: int, height: int) -> Image.Image:
    """Each column x has value x (mod 256) in every channel: crops are easy to locate."""
    row = (np.arange(width) % 256).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))


def test_center_crop_offsets_and_time_ids():
    image = _columns_image(300, 200)  # W=300, H=200
    tensor, cond = transform_image(image, (128, 128))
    # Cover 128x128: scale 0.64 -> 192x128; centre crop left = (192 - 128) // 2 = 32.
    assert cond.original_size == (200, 300)
    assert cond.crop_top_left == (0, 32)
    assert cond.target_size == (128, 128)
    assert cond.time_ids() == (200, 300, 0, 32, 128, 128)
    assert tensor.shape == (3, 128, 128) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    resized = np.asarray(image.resize((192, 128), Image.Resampling.LANCZOS)).astype(np.float32)
    expected = torch.from_numpy(resized[:, 32:160]).permute(2, 0, 1) / 127.5 - 1
    _assert_close(tensor, expected)
    # Upscaling a small image: no crop, original size kept.
    small, cond = transform_image(_columns_image(50, 50), (64, 64))
    assert small.shape == (3, 64, 64) and cond.time_ids() == (50, 50, 0, 0, 64, 64)
    # Portrait into a landscape bucket: the crop is vertical.
    _, cond = transform_image(_columns_image(100, 200), (192, 128))
    assert cond.time_ids() == (200, 100, (384 - 128) // 2, 0, 128, 192)


@pytest.mark.parametrize(
    "make_rng", [random.Random, lambda seed: torch.Generator().manual_seed(seed)]
)
def test_random_crop_and_flip_are_seeded_and_consistent(make_rng):
    image = _columns_image(300, 200)
    resized = np.asarray(image.resize((192, 128), Image.Resampling.LANCZOS)).astype(np.float32)
    reference = torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1  # (3, 128, 192)

    lefts = set()
    for seed in range(20):
        tensor, cond = transform_image(image, (128, 128), random_crop=True, rng=make_rng(seed))
        top, left = cond.crop_top_left
        assert top == 0 and 0 <= left <= 64 and not cond.flipped
        _assert_close(tensor, reference[:, :, left : left + 128])
        again = transform_image(image, (128, 128), random_crop=True, rng=make_rng(seed))
        assert again[1] == cond
        lefts.add(left)
    assert len(lefts) > 10  # offsets really vary with the seed

    rng = make_rng(3)
    tensor, cond = transform_image(image, (128, 128), random_crop=True, flip_prob=1.0, rng=rng)
    assert cond.flipped
    top, left = cond.crop_top_left
    # Left is measured in the mirrored image: a mirrored crop of the original at 64 - left.
    unflipped_left = 192 - 128 - left
    expected = reference[:, :, unflipped_left : unflipped_left + 128].flip(-1)
    _assert_close(tensor, expected)


def test_flip_probability_and_explicit_rng_required():
    image = _columns_image(64, 64)
    rng = random.Random(0)
    flips = [
        transform_image(image, (64, 64), flip_prob=0.5, rng=rng)[1].flipped for _ in range(200)
    ]
    assert 70 < sum(flips) < 130
    tensor, cond = transform_image(image, (64, 64), flip_prob=1.0, rng=rng)
    assert cond.crop_top_left == (0, 0)
    _assert_close(tensor, transform_image(image, (64, 64))[0].flip(-1))
    with pytest.raises(ValueError, match="explicit rng"):
        transform_image(image, (64, 64), random_crop=True)
    with pytest.raises(ValueError, match="explicit rng"):
        transform_image(image, (64, 64), flip_prob=0.5)


# ---------------------------------------------------------------------------------------------
# Bundled example dataset


def test_example_dataset_validates_cleanly():
    result = validate_dataset(EXAMPLES / "shapes", policy="fail", tokenizer=_WordTokenizer())
    assert len(result.items) == 32 and result.problems == ()
    sizes = {(i.width, i.height) for i in result.items}
    assert sizes == {(256, 256), (384, 256), (256, 384)}
    assert {Path(i.key).suffix for i in result.items} == {".png", ".jpg"}
    for item in result.items:
        words = item.caption.split()
        assert words[0] == "a" and words[3:5] == ["on", "a"] and words[-1] == "background"
    prompts = (EXAMPLES / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 16 and all(p.startswith("a ") for p in prompts)
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 1_000_000


def test_example_dataset_script_is_deterministic(tmp_path):
    script = EXAMPLES / "make_example_dataset.py"
    args = ["--out-dir", str(tmp_path / "shapes"), "--prompts", str(tmp_path / "prompts.txt")]
    subprocess.run([sys.executable, str(script), *args], check=True)
    assert (tmp_path / "prompts.txt").read_text() == (EXAMPLES / "prompts.txt").read_text()
    ours = sorted(p.name for p in (tmp_path / "shapes").iterdir())
    assert ours == sorted(p.name for p in (EXAMPLES / "shapes").iterdir())
    for name in ours:
        new, shipped = tmp_path / "shapes" / name, EXAMPLES / "shapes" / name
        if name.endswith(".txt"):
            assert new.read_text() == shipped.read_text()
        else:  # compare pixels: encoders may differ across Pillow builds by a little
            diff = np.abs(np.asarray(load_image(new), int) - np.asarray(load_image(shipped), int))
            assert diff.max() <= 8, name
