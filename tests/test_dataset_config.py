"""kohya dataset configs: subsets, repeats, regularization images, per-subset caption rules."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from sdxl.dataset_config import (
    DatasetConfigError,
    Subset,
    plan_subsets,
    read_dataset_config,
    validate_subsets,
)
from sdxl.train.data_order import epoch_visits

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_kohya_config_levels_inherit_downwards(tmp_path):
    config = read_dataset_config(_toml(tmp_path, """
        [general]
        shuffle_caption = true
        caption_extension = '.txt'
        keep_tokens = 1

        [[datasets]]
        resolution = [512, 512]
        batch_size = 4
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = 'a'
          class_tokens = 'sks girl'
          num_repeats = 10

          [[datasets.subsets]]
          image_dir = 'reg'
          is_reg = true
          keep_tokens = 3
          caption_prefix = 'photo of'
        """))  # fmt: skip
    assert (config.resolution, config.batch_size) == (512, 4)
    a, reg = config.subsets
    assert (a.image_dir, a.num_repeats, a.keep_tokens, a.class_tokens) == ("a", 10, 2, "sks girl")
    assert a.shuffle_caption and a.caption_extension == ".txt" and not a.is_reg
    assert (reg.is_reg, reg.keep_tokens, reg.num_repeats, reg.caption_prefix) == (
        True, 3, 1, "photo of")  # fmt: skip
    assert a.flip_aug is False  # kohya's default, not --random_flip's


def test_kohya_defaults_when_the_config_is_silent(tmp_path):
    (subset,) = read_dataset_config(_toml(tmp_path, """
        [[datasets]]
          [[datasets.subsets]]
          image_dir = 'a'
        """)).subsets  # fmt: skip
    assert subset.caption_extension == ".caption"  # kohya's default extension
    assert subset.shuffle_caption is None  # unset: the run's --shuffle_caption decides
    plan = plan_subsets([subset], random_flip=True, caption_dropout=0.25, keep_tokens=2)[0]
    assert (plan.flip, plan.caption_dropout_rate, plan.keep_tokens) == (False, 0.25, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeat=2\n",
         "unknown key 'num_repeat'"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\ncolor_aug=true\n",
         "color_aug is a kohya option this trainer does not support"),
        ("[general]\nmin_bucket_reso=256\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
         "min_bucket_reso is a kohya option"),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", "image_dir is required"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeats=0\n",
         "num_repeats must be an integer >= 1"),
        ("[[datasets]]\nresolution=500\n[[datasets.subsets]]\nimage_dir='a'\n",
         "resolution must be a multiple of 64"),
        ("[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\n"
         "[[datasets]]\nresolution=1024\n[[datasets.subsets]]\nimage_dir='b'\n",
         "different resolutions"),
        ("[general]\nis_reg=true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
         "is_reg belongs in a [[datasets.subsets]]"),
        ("[datasets]\nx=1\n", "no [[datasets]]"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a\n", "not a readable TOML file"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, message):
    path = _toml(tmp_path, text)
    with pytest.raises(DatasetConfigError, match=re.escape(message)) as err:
        read_dataset_config(path)
    assert str(path) in str(err.value)


def test_epoch_visits_repeat_and_balance_regularization_as_kohya():
    assert sorted(epoch_visits([(0, 3), (1, 1)], [])) == [0, 0, 0, 1]
    # 4 training visits: the regularization images fill 4 (first pass with their own repeats).
    assert sorted(epoch_visits([(0, 2), (1, 2)], [(5, 1), (6, 1), (7, 1)])) == [0, 0, 1, 1,
                                                                                  5, 5, 6, 7]  # fmt: skip
    assert sorted(epoch_visits([(0, 1)], [(5, 3), (6, 3)])) == [0, 5, 5, 5]  # cut short


def _folder(tmp_path: Path, name: str, images: list[str], caption_ext: str | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for image in images:
        src = next(p for p in SHAPES.glob(f"{image}.*") if p.suffix != ".txt")
        shutil.copy(src, folder / src.name)
        if caption_ext:
            shutil.copy(src.with_suffix(".txt"), folder / f"{src.stem}{caption_ext}")
    return folder


def test_subsets_caption_rules_and_unique_keys(tmp_path):
    a = _folder(tmp_path, "a", ["00_red_circle", "04_red_square"], ".caption")
    reg = _folder(tmp_path, "reg", ["00_red_circle", "08_red_triangle"], None)
    (a / "stray.txt").write_text("not a caption here")  # another extension: not read
    result = validate_subsets(
        [Subset(str(a), caption_extension=".caption", caption_prefix="sks,", caption_suffix="!"),
         Subset(str(reg), class_tokens="a shape", is_reg=True)], min_size=64,
    )  # fmt: skip
    by_key = {it.key: it for it in result.items}
    assert sorted(by_key) == ["0/00_red_circle.png", "0/04_red_square.png",
                              "1/00_red_circle.png", "1/08_red_triangle.png"]  # fmt: skip
    expected = (SHAPES / "00_red_circle.txt").read_text().strip()
    assert by_key["0/00_red_circle.png"].caption == f"sks, {expected} !"
    assert by_key["1/08_red_triangle.png"].caption == "a shape"  # no caption file: class_tokens
    assert {it.subset for it in result.items} == {0, 1}
    # Without class_tokens, a missing caption is a problem named with its folder.
    with pytest.raises(ValueError, match=re.escape(f"dataset {reg}: no usable items")):
        validate_subsets([Subset(str(reg))], min_size=64)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def subset_run(tiny_dir, tmp_path_factory):
    """A CLI run on a kohya TOML: 3 training images x 2 repeats, 2 regularization images."""
    from sdxl.cli.train import main

    root = tmp_path_factory.mktemp("subsets")
    _folder(root, "train", ["00_red_circle", "04_red_square", "08_red_triangle"], ".caption")
    _folder(root, "reg", ["12_red_star", "16_red_circle"], None)
    toml = root / "dataset.toml"
    toml.write_text(textwrap.dedent(f"""
        [general]
        caption_extension = '.caption'
        [[datasets]]
        resolution = 64
        batch_size = 1
          [[datasets.subsets]]
          image_dir = '{root / "train"}'
          num_repeats = 2
          flip_aug = true
          [[datasets.subsets]]
          image_dir = '{root / "reg"}'
          is_reg = true
          class_tokens = 'a star'
          caption_dropout_rate = 0.5
        """))  # fmt: skip
    out = root / "out"
    main(["--dataset_config", str(toml), "--pretrained_model", str(tiny_dir), "--output_dir",
          str(out), "--num_epochs", "1", "--precision", "fp32", "--device", "cpu",
          "--lora_rank", "2", "--log_interval", "1", "--prior_loss_weight", "0.5",
          "--no-gradient_checkpointing", "--prediction_type", "epsilon"])  # fmt: skip
    return out


def test_a_kohya_config_trains_every_visit(subset_run):
    import json

    from safetensors import safe_open

    cfg = json.loads((subset_run / "config.json").read_text())
    assert (cfg["image_size"], cfg["batch_size"], cfg["prior_loss_weight"]) == (64, 1, 0.5)
    assert [s["num_repeats"] for s in cfg["subsets"]] == [2, 1]
    with safe_open(str(subset_run / "lora_final.safetensors"), "pt") as f:
        meta = f.metadata()
    # 3 images x 2 repeats + as many regularization visits, one image per step.
    assert int(meta["ss_steps"]) == 12
    cache = json.loads((subset_run / "cache" / "latents" / "index.json").read_text())
    captions = {it["source"]: it["caption"] for it in cache["items"]}
    assert captions["1/12_red_star.png"] == "a star"
    assert captions["0/00_red_circle.png"] == (SHAPES / "00_red_circle.txt").read_text().strip()


def test_trainer_visits_weights_flips_and_dropout_per_subset(subset_run, tiny_dir):
    """The same cache as a pipeline would pass it: only how it is visited changes."""
    import dataclasses
    import json

    from sdxl.train import distributed
    from sdxl.train.caches import prepare_caches
    from sdxl.train.config import TrainConfig
    from sdxl.train.loop import Trainer

    saved = json.loads((subset_run / "config.json").read_text())
    base = TrainConfig.from_dict({**saved, "data_dir": str(subset_run / "cache"),
                                  "output_dir": str(subset_run.parent / "again")})  # fmt: skip
    dist = distributed.setup("cpu")

    def trainer(**changes) -> Trainer:
        cfg = dataclasses.replace(base, **changes)
        return Trainer(cfg, prepare_caches(cfg, Path(tiny_dir), None, dist), dist)

    t = trainer()
    assert t.steps_per_epoch() == 12
    reg = [i for i in t.samples if t.data.subset(i) == 1]
    assert t.loss_scale == {i: 0.5 for i in reg}
    train = [i for i in t.samples if t.data.subset(i) == 0]
    assert all(t.partner[i] != i for i in train) and all(t.partner[i] == i for i in reg)
    rows = trainer(batch_size=2).read_group([(0, [train[0], reg[0]])])[0]  # a batch of two
    assert rows["drop_rate"].tolist() == [0.0, 0.5]
    assert rows["weight"].tolist() == pytest.approx([0.5, 0.25])  # 1/2, and x0.5 for reg
    assert t.text is None  # nothing shuffles: the text cache
    shuffled = (dataclasses.replace(base.subsets[0], shuffle_caption=True, keep_tokens=1),
                base.subsets[1])  # fmt: skip
    s = trainer(subsets=shuffled)
    assert s.text is not None  # one subset shuffles: text is encoded in the step
    assert (s._caption_options(train[0]), s._caption_options(reg[0])) == ((True, 1), (False, 0))
    # --shuffle_caption, but every subset says no: nothing shuffles, the text cache serves.
    unshuffled = tuple(dataclasses.replace(s, shuffle_caption=False) for s in base.subsets)
    assert trainer(shuffle_caption=True, subsets=unshuffled).text is None
    # One rate for every subset, not --caption_dropout's: still each row's own rate.
    same = tuple(dataclasses.replace(s, caption_dropout_rate=0.5) for s in base.subsets)
    rows = trainer(subsets=same, batch_size=2).read_group([(0, [train[0], reg[0]])])[0]
    assert rows["drop_rate"].tolist() == [0.5, 0.5]
    three = [dataclasses.replace(s, num_repeats=3) if not s.is_reg else s for s in base.subsets]
    assert trainer(subsets=tuple(three)).steps_per_epoch() == 18  # 9 + 9 regularization
    with pytest.raises(Exception, match="2 data subsets but the settings list 1"):
        trainer(subsets=base.subsets[:1])


def test_per_row_dropout_rates_match_the_scalar_draw():
    from sdxl.train.config import TrainConfig
    from sdxl.train.loss import draw_step_noise

    cfg = TrainConfig(data_dir="", caption_dropout=0.3, timestep_max=1000)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    scalar = draw_step_noise(g(), 64, (4, 8, 8), cfg)
    same = draw_step_noise(g(), 64, (4, 8, 8), cfg, torch.full((64,), 0.3))
    assert torch.equal(scalar.drop_caption, same.drop_caption)
    rates = torch.tensor([0.0, 0.999] * 32)
    mixed = draw_step_noise(g(), 64, (4, 8, 8), cfg, rates).drop_caption
    assert not mixed[0::2].any() and mixed[1::2].float().mean() > 0.9


def test_an_edited_caption_rule_rebuilds_the_cache(subset_run, tiny_dir):
    """The cache key holds each subset's caption rules: a new prefix is a new cache (and, with
    it, a new data key, so training starts over), the same settings reuse it."""
    import dataclasses
    import json

    from sdxl.train import distributed
    from sdxl.train.caches import plan_caches
    from sdxl.train.config import TrainConfig

    saved = json.loads((subset_run / "config.json").read_text())
    cfg = TrainConfig.from_dict({**saved, "output_dir": str(subset_run)})
    dist = distributed.setup("cpu")
    assert plan_caches(cfg, Path(tiny_dir), dist) is None  # unchanged: reused as it is
    edited = (dataclasses.replace(cfg.subsets[0], caption_prefix="sks"), cfg.subsets[1])
    build = plan_caches(dataclasses.replace(cfg, subsets=edited), Path(tiny_dir), dist)
    assert build is not None and "subsets" in build.reason
    assert {it.caption.split()[0] for it in build.result.items if it.subset == 0} == {"sks"}
