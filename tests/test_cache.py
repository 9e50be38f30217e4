"""Latent and text caches on the tiny SDXL: equal to encoding directly, sharded, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl.data import latent_cache
from sdxl.data.buckets import assign_bucket, make_buckets
from sdxl.data.cached_dataset import CachedDataset, is_cache_dir
from sdxl.data.dataset import load_image, validate_dataset, write_manifest
from sdxl.data.latent_cache import (
    build_latent_cache,
    build_latent_cache_from_manifest,
    merge_latent_index,
)
from sdxl.data.shards import CacheError
from sdxl.data.text_cache import build_text_cache
from sdxl.data.transforms import transform_image
from sdxl.models.networks import MODEL_CLASSES
from sdxl.sharding import shard_ranges
from sdxl.weights import WeightsError

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes"
# Square 256px images plus one wide (384x256) and one tall (256x384): two buckets at 192.
FILES = ["00_red_circle.png", "03_yellow_circle.jpg", "07_yellow_square.jpg", "13_blue_star.jpg"]
IMAGE_SIZE = 192  # buckets (128, 256), (192, 192), (256, 128)
SEED = 7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    data = tmp_path_factory.mktemp("shapes")
    for name in FILES:
        shutil.copy(SHAPES / name, data / name)
        shutil.copy((SHAPES / name).with_suffix(".txt"), data)
    result = validate_dataset(data, min_size=64, policy="fail")
    assert len(result.items) == len(FILES)
    return list(result.items)


@pytest.fixture(scope="module")
def built(items, tiny_dir, tmp_path_factory):
    """Both caches: latents in 2 shards built by separate calls, then merged."""
    root = tmp_path_factory.mktemp("caches")
    latents, texts = root / "latents", root / "text"
    for k in range(2):
        build_latent_cache(
            items, tiny_dir, latents, image_size=IMAGE_SIZE, shard_index=k, num_shards=2,
            batch_size=2, random_crop=True, flip=True, seed=SEED, progress=False,
        )  # fmt: skip
    assert not (latents / "index.json").exists()  # one shard of several never merges
    merge_latent_index(latents, 2)
    build_text_cache(items, tiny_dir, texts, batch_size=2, items_per_shard=3, progress=False)
    return latents, texts


@pytest.fixture(scope="module")
def vae(tiny_dir):
    from sdxl.weights import load_component

    return load_component(
        tiny_dir, "vae", model_cls=MODEL_CLASSES["vae"], dtype=torch.float32, device="cpu"
    ).eval()


@pytest.fixture(scope="module")
def text_models(tiny_dir):
    from sdxl.text import load_tokenizers
    from sdxl.weights import load_component

    encoders = tuple(
        load_component(
            tiny_dir, n, model_cls=MODEL_CLASSES[n], dtype=torch.float32, device="cpu"
        ).eval()
        for n in ("text_encoder", "text_encoder_2")
    )
    return load_tokenizers(tiny_dir), encoders


def copy_cache(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_index_lists_every_item_and_flip_variant(built, items):
    latents, _ = built
    index = json.loads((latents / "index.json").read_text())
    assert index["count"] == 2 * len(items) == len(index["items"])
    assert index["num_items"] == len(items)
    assert index["shards"] == ["shard-00000", "shard-00001"]
    assert index["scaled"] is True and index["scaling_factor"] == pytest.approx(0.13025)
    assert index["settings"] == {
        "image_size": IMAGE_SIZE, "crop": "random", "flip": True, "seed": SEED,
        "scaling_factor": index["scaling_factor"], "vae": None,
    }  # fmt: skip
    keys = [r["key"] for r in index["items"]]
    assert keys == [f"{i:06d}{s}" for i in range(len(items)) for s in ("", "-flip")]
    assert [r["flipped"] for r in index["items"]] == [False, True] * len(items)
    assert [r["source"] for r in index["items"][::2]] == [it.key for it in items]
    # contiguous split: items 0-1 in shard 0, items 2-3 in shard 1
    assert [r["shard"] for r in index["items"]] == ["shard-00000"] * 4 + ["shard-00001"] * 4


def test_latents_equal_direct_vae_encode(built, items, vae):
    latents, texts = built
    ds = CachedDataset(latents, texts)
    buckets = make_buckets(IMAGE_SIZE)
    sf = vae.config.scaling_factor
    wide = next(i for i, it in enumerate(items) if it.width > it.height)
    for i in (0, wide):
        bucket = assign_bucket(items[i].width, items[i].height, buckets)
        rng = torch.Generator().manual_seed(SEED + i)  # the cache's per-item generator
        image = load_image(items[i].path)
        for flip in (0.0, 1.0):
            px, cond = transform_image(image, bucket, random_crop=True, flip_prob=flip, rng=rng)
            with torch.no_grad():
                mean, logvar = vae.encode(px[None])
            sample = ds[2 * i + int(flip)]
            assert sample["flipped"] is cond.flipped is bool(flip)
            assert sample["bucket"] == bucket
            assert sample["mean"].dtype == torch.float32
            assert sample["mean"].shape == (4, bucket[1] // 8, bucket[0] // 8)
            assert rel_err(sample["mean"], mean[0] * sf) < 1e-4
            assert rel_err(sample["std"], torch.exp(0.5 * logvar[0]) * sf) < 1e-4
            assert sample["time_ids"].dtype == torch.float32
            assert sample["time_ids"].tolist() == list(cond.time_ids())
    # the wide image has room to crop, and its random crop moved off the centre
    assert ds[2 * wide]["bucket"] == (256, 128)
    assert ds[2 * wide]["time_ids"][2] != (171 - 128) // 2


def test_buckets_and_variants(built, items):
    ds = CachedDataset(*built)
    assert len(ds) == 2 * len(items)
    groups = ds.buckets()
    assert sorted(i for g in groups.values() for i in g) == list(range(len(ds)))
    for bucket, indices in groups.items():
        for i in indices:
            it = items[i // 2]
            assert bucket == assign_bucket(it.width, it.height, make_buckets(IMAGE_SIZE))
    assert set(groups) == {(192, 192), (256, 128), (128, 256)}
    assert ds.variants()["000003"] == [6, 7]
    assert [ds.is_flipped(i) for i in (6, 7)] == [False, True]
    assert ds.source(6) == ds.source(7) == items[3].key


def test_text_embeddings_equal_encode_prompts(built, items, text_models):
    from sdxl.text import encode_prompts

    ds = CachedDataset(*built)
    tokenizers, encoders = text_models
    with torch.no_grad():
        embeds, pooled = encode_prompts(tokenizers, encoders, [it.caption for it in items])
        empty_embeds, empty_pooled = encode_prompts(tokenizers, encoders, [""])
    for i, it in enumerate(items):
        for sample in (ds[2 * i], ds[2 * i + 1]):  # the flip variant shares its item's text
            assert sample["caption"] == it.caption
            assert sample["prompt_embeds"].shape == embeds.shape[1:]
            assert rel_err(sample["prompt_embeds"], embeds[i]) < 1e-4
            assert rel_err(sample["pooled"], pooled[i]) < 1e-4
    e, p = ds.empty_text()
    assert rel_err(e, empty_embeds[0]) < 1e-4 and rel_err(p, empty_pooled[0]) < 1e-4
    assert not torch.allclose(e, embeds[0])
    index = json.loads((built[1] / "index.json").read_text())
    assert index["count"] == len(items) and len(index["shards"]) == 2  # 3 + 1 items
    assert index["shapes"] == {"prompt_embeds": list(embeds.shape[1:]), "pooled": [pooled.shape[1]]}


def count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = latent_cache._encode_batch

    def counted(vae, pixels, device, dtype):
        calls.append(len(pixels))
        return real(vae, pixels, device, dtype)

    monkeypatch.setattr(latent_cache, "_encode_batch", counted)
    return calls


def test_complete_shard_is_skipped_and_missing_one_rebuilt(
    built, items, tiny_dir, tmp_path, monkeypatch
):
    latents = copy_cache(built[0], tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in latents.iterdir()}
    reference = load_file(latents / "shard-00001.safetensors")
    calls = count_encodes(monkeypatch)
    kwargs = dict(image_size=IMAGE_SIZE, num_shards=2, batch_size=3, random_crop=True, flip=True,
                  seed=SEED, progress=False)  # fmt: skip
    build_latent_cache(items, tiny_dir, latents, shard_index=0, **kwargs)
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in latents.iterdir()} == before

    (latents / "shard-00001.safetensors").unlink()
    build_latent_cache(items, tiny_dir, latents, shard_index=1, **kwargs)
    assert sum(calls) == 4  # items 2 and 3, each unflipped and flipped
    assert (latents / "shard-00000.safetensors").stat().st_mtime_ns == before[
        "shard-00000.safetensors"
    ]
    rebuilt = load_file(latents / "shard-00001.safetensors")
    assert rebuilt.keys() == reference.keys()
    for k in reference:  # another batch size, the same numbers
        assert rel_err(rebuilt[k], reference[k]) < 1e-5, k


def test_changed_settings_rebuild_the_shard(built, items, tiny_dir, tmp_path, monkeypatch):
    latents = copy_cache(built[0], tmp_path)
    calls = count_encodes(monkeypatch)
    build_latent_cache(
        items, tiny_dir, latents, image_size=IMAGE_SIZE, shard_index=0, num_shards=2,
        random_crop=True, flip=True, seed=SEED + 1, progress=False,
    )  # fmt: skip
    assert sum(calls) == 4
    with pytest.raises(CacheError, match="built with"):
        merge_latent_index(latents, 2)  # shard 1 still has the old seed


def test_merge_restores_a_deleted_index(built, tmp_path):
    latents = copy_cache(built[0], tmp_path)
    original = (latents / "index.json").read_text()
    (latents / "index.json").unlink()
    assert not is_cache_dir(latents)
    with pytest.raises(CacheError, match=f"{latents}.*merge_latent_index"):
        CachedDataset(latents, built[1])
    merge_latent_index(latents, 2)
    assert (latents / "index.json").read_text() == original
    assert is_cache_dir(latents, "latents") and not is_cache_dir(latents, "text")


def test_merge_names_missing_shards(built, tmp_path):
    latents = copy_cache(built[0], tmp_path)
    (latents / "shard-00001.json").unlink()
    with pytest.raises(CacheError, match="missing shard-00001; build those shards"):
        merge_latent_index(latents, 2)
    with pytest.raises(CacheError, match="another latents cache layout"):
        merge_latent_index(latents, 1)


def test_manifest_single_call_matches_sharded_build(built, items, tiny_dir, tmp_path):
    manifest = tmp_path / "items.csv"
    write_manifest(items, manifest)
    out = build_latent_cache_from_manifest(
        manifest, tiny_dir, tmp_path / "latents", image_size=IMAGE_SIZE, items_per_shard=3,
        batch_size=4, random_crop=True, flip=True, seed=SEED, progress=False,
    )  # fmt: skip
    assert is_cache_dir(out, "latents")  # items_per_shard builds every shard and merges
    ds, ref = CachedDataset(out, built[1]), CachedDataset(*built)
    assert len(ds) == len(ref)
    for i in range(len(ds)):
        a, b = ds[i], ref[i]
        assert a["key"] == b["key"] and torch.equal(a["time_ids"], b["time_ids"])
        assert rel_err(a["mean"], b["mean"]) < 1e-5 and rel_err(a["std"], b["std"]) < 1e-5


def test_center_crop_without_flip(items, tiny_dir, tmp_path):
    latents = build_latent_cache(
        items[1:3], tiny_dir, tmp_path / "latents", image_size=IMAGE_SIZE, progress=False
    )
    index = json.loads((latents / "index.json").read_text())
    assert index["settings"]["crop"] == "center" and index["settings"]["flip"] is False
    assert [r["key"] for r in index["items"]] == ["000000", "000001"]
    assert not any(r["flipped"] for r in index["items"])
    for r in index["items"]:
        it = next(x for x in items if x.key == r["source"])
        bucket = assign_bucket(it.width, it.height, make_buckets(IMAGE_SIZE))
        _, cond = transform_image(load_image(it.path), bucket)
        assert r["crop_top_left"] == list(cond.crop_top_left)
        assert r["original_size"] == [it.height, it.width]


def test_separate_vae_folder(built, items, tiny_dir, tmp_path):
    vae_dir = tmp_path / "sdxl-vae"
    shutil.copytree(tiny_dir / "vae", vae_dir)  # config.json + weights at the top, like a hub VAE
    latents = build_latent_cache(
        items[:1], tiny_dir, tmp_path / "latents", image_size=IMAGE_SIZE, random_crop=True,
        flip=True, seed=SEED, progress=False, vae_dir=vae_dir,
    )  # fmt: skip
    index = json.loads((latents / "index.json").read_text())
    assert index["settings"]["vae"] == str(vae_dir)
    ours, ref = load_file(latents / "shard-00000.safetensors"), CachedDataset(*built)
    assert rel_err(ours["000000-flip.mean"], ref[1]["mean"]) < 1e-5
    with pytest.raises(WeightsError, match="VAE folder holding config.json"):
        build_latent_cache(items, tiny_dir, tmp_path / "x", image_size=IMAGE_SIZE, vae_dir=tmp_path)


def test_missing_or_mismatched_caches_fail_clearly(built, items, tiny_dir, tmp_path):
    latents, texts = built
    missing = tmp_path / "nowhere"
    with pytest.raises(CacheError, match=f"latents cache {missing} has no readable index.json"):
        CachedDataset(missing, texts)
    with pytest.raises(CacheError, match=f"text cache {missing}.*build_text_cache"):
        CachedDataset(latents, missing)
    with pytest.raises(CacheError, match="is not a version-1 text cache"):
        CachedDataset(latents, latents)
    other = build_text_cache(items[::-1], tiny_dir, tmp_path / "text", progress=False)
    with pytest.raises(CacheError, match=f"text cache {other} and latent cache {latents} disagree"):
        CachedDataset(latents, other)
    broken = copy_cache(latents, tmp_path)
    (broken / "shard-00000.safetensors").unlink()
    with pytest.raises(CacheError, match="incomplete \\(missing shard-00000.safetensors\\)"):
        CachedDataset(broken, texts)
    assert not is_cache_dir(missing) and is_cache_dir(texts, "text")


def test_dataset_pickles_without_open_handles(built):
    import pickle

    ds = CachedDataset(*built)
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["mean"], first["mean"])


def test_shard_ranges_split_evenly_or_by_size():
    assert shard_ranges(5, num_shards=2) == [range(0, 2), range(2, 5)]
    assert shard_ranges(1, num_shards=3) == [range(0, 0), range(0, 0), range(0, 1)]
    assert shard_ranges(4, items_per_shard=3) == [range(0, 3), range(3, 4)]
    assert shard_ranges(0, items_per_shard=3) == [range(0, 0)]  # always at least one shard
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        shard_ranges(4, num_shards=0)
    with pytest.raises(ValueError, match="items_per_shard must be >= 1"):
        shard_ranges(4, items_per_shard=0)


def test_dataset_checks_the_settings_the_run_expects(built):
    latents, texts = built
    CachedDataset(latents, texts, expect={"image_size": IMAGE_SIZE, "flip": True, "seed": SEED})
    with pytest.raises(
        CacheError,
        match=f"latent cache {latents} was built with image_size={IMAGE_SIZE}, crop='random' but "
        "this run expects image_size=64, crop='center'; train with the cache's values "
        r"\(--image_size on the command line\), or from the images to cache them anew",
    ):
        CachedDataset(latents, texts, expect={"image_size": 64, "crop": "center", "flip": True})


def test_trainer_refuses_a_pipeline_cache_of_another_size(built, tiny_dir, tmp_path):
    """A pipeline-built cache pair as --data_dir: only its image size must be the run's."""
    from sdxl.train import distributed
    from sdxl.train.caches import prepare_caches
    from sdxl.train.config import TrainConfig
    from sdxl.train.loop import Trainer

    root = built[0].parent  # latents/ and text/: the layout the workflow writes
    dist = distributed.setup("cpu")

    def caches(**changes):
        cfg = TrainConfig(data_dir=str(root), pretrained_model=str(tiny_dir),
                          output_dir=str(tmp_path / "run"), device="cpu", precision="fp32",
                          **changes)  # fmt: skip
        return cfg, prepare_caches(cfg, tiny_dir, None, dist)

    _, same = caches(image_size=IMAGE_SIZE, center_crop=True, random_flip=False, seed=SEED + 1)
    assert same.expect == {"image_size": IMAGE_SIZE}
    CachedDataset(same.latent_dir, same.text_dir, same.expect)
    cfg, other = caches(image_size=128)
    with pytest.raises(CacheError, match=f"{root / 'latents'} was built with image_size=192"):
        Trainer(cfg, other, dist)
    assert not (tmp_path / "run").exists()  # refused before anything is written
