"""Text-encoder LoRA (--train_text_encoder) and on-the-fly text encoding (--shuffle_caption,
--keep_tokens) on the tiny model: trained, resumed exactly, written as kohya's lora_te1_/lora_te2_,
loaded by diffusers with the same effect, applied in generation."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl.cli.train import build_parser, config_from_args
from sdxl.models.networks import MODEL_CLASSES
from sdxl.train.config import TrainConfig
from sdxl.train.loop import train
from sdxl.train.text_encoding import StepText, shuffle_caption
from tests.interrupt import killed_after_step

ROOT = Path(__file__).resolve().parents[1]
# Comma-separated tags, already in kohya's normal form (pieces stripped, joined by ", ").
TAGS = ["shape, red, round, small, on white", "shape, blue, square, large, on black",
        "shape, green, round, tiny, on gray", "shape, yellow, star, bright, on blue"]  # fmt: skip


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--pretrained_model", "builtin:tiny", "--output_dir", str(out),
            "--image_size", "64", "--batch_size", "2", "--num_epochs", "2", "--precision", "fp32",
            "--device", "cpu", "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3",
            "--log_interval", "1", "--seed", "3", "--no-gradient_checkpointing",
            "--no-compile", *extra]  # fmt: skip


def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(_argv(data, out, *extra)))


TE_FLAGS = ("--train_text_encoder", "--text_encoder_lr", "4e-2", "--unet_lr", "2e-3",
            "--warmup_steps", "4", "--shuffle_caption", "--keep_tokens", "1",
            "--caption_dropout", "0.3", "--max_steps", "2", "--checkpoint_steps", "1")  # fmt: skip


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tagged")
    for image, tags in zip(sorted((ROOT / "examples" / "shapes").glob("*.png"))[:4], TAGS,
                           strict=True):  # fmt: skip
        shutil.copy(image, folder / image.name)
        (folder / f"{image.stem}.txt").write_text(tags)
    return folder


@pytest.fixture(scope="module")
def cached_run(tiny_dir, tagged, tmp_path_factory) -> Path:
    """Two steps from the text cache (caption dropout on); its cache serves the other runs."""
    out = tmp_path_factory.mktemp("cached")
    train(_cfg(tagged, out, "--max_steps", "2", "--caption_dropout", "0.5"))
    return out


@pytest.fixture(scope="module")
def te_run(tiny_dir, cached_run, tmp_path_factory) -> tuple[Path, list]:
    """train_sdxl.py with the text-encoder flags: 2 steps; the captions each step saw."""
    from sdxl.cli.train import main

    out = tmp_path_factory.mktemp("te")
    prompts = out.parent / "te-prompts.txt"
    prompts.write_text("shape, red, round --l 7\n")
    grids = ("--validation_caption_file", str(prompts), "--validation_steps", "2")
    with _seen_captions() as seen:
        assert main(_argv(cached_run / "cache", out, *TE_FLAGS, *grids)) == 0
    return out, seen


class _seen_captions:
    """Record (sample, its caption, the caption trained on) of every row tokenized, in order."""

    def __enter__(self) -> list:
        self.seen, self.original = [], StepText.caption

        def spy(text, index, caption, seed):
            got = self.original(text, index, caption, seed)
            self.seen.append((index, caption, got))
            return got

        StepText.caption = spy
        return self.seen

    def __exit__(self, *exc) -> None:
        StepText.caption = self.original


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "metrics.csv").open()))


def test_train_text_encoder_trains_both_parts_at_their_rates(te_run):
    out, _ = te_run
    lora = load_file(str(out / "lora_final.safetensors"))
    # up starts at zero. SDXL reads CLIP-L's penultimate layer only, so its last layer (2 of the
    # tiny model's 3) gets no gradient; bigG's last layer makes its pooled output.
    unused = "lora_te1_text_model_encoder_layers_2_"
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = {k: v for k, v in lora.items() if k.startswith(prefix) and k.endswith("up.weight")}
        assert ups and all((v.abs().max() > 0) != k.startswith(unused) for k, v in ups.items())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in lora
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_down.weight" in lora
    state = torch.load(out / "checkpoint_final.pt", weights_only=False)
    lrs = [float(g["lr"]) for g in state["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([2e-3 * 2 / 4, 4e-2 * 2 / 4])  # warmup scales each group's rate
    assert float(_rows(out)[-1]["lr"]) == pytest.approx(1e-3)  # metrics' lr: the UNet's
    from safetensors import safe_open

    with safe_open(str(out / "lora_final.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_train_unet_only"] == "False"
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.002", "0.04")


def test_shuffled_captions_keep_the_first_tags_and_resume_exactly(tiny_dir, cached_run, te_run,
                                                                  tmp_path):  # fmt: skip
    out, seen = te_run
    assert len(seen) == 2 * 2  # 2 steps of batch 2
    for _, original, caption in seen:
        tags, want = caption.split(", "), original.split(", ")
        assert tags[0] == want[0] and sorted(tags) == sorted(want)  # keep_tokens 1
    assert any(c != original for _, original, c in seen)  # some order differs from the file's
    # A run stopped after step 1 and resumed: the same captions, the same LoRA bit for bit.
    resumed = tmp_path / "resumed"
    cfg = _cfg(cached_run / "cache", resumed, *TE_FLAGS)
    with _seen_captions() as again:
        with killed_after_step(1):
            train(cfg)
        train(cfg)
    assert again[:2] + again[-2:] == seen  # (the stopped run may have read step 2 ahead)
    want, got = (load_file(str(p / "lora_final.safetensors")) for p in (out, resumed))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_shuffle_caption_is_kohyas():
    caption = "a,  b , c, d, e, f"
    outs = {shuffle_caption(caption, 2, seed) for seed in range(20)}
    assert all(o.startswith("a, b, ") for o in outs) and len(outs) > 5
    assert all(sorted(o.split(", ")) == list("abcdef") for o in outs)
    assert shuffle_caption(caption, 2, "x") == shuffle_caption(caption, 2, random.Random("x"))
    assert shuffle_caption(caption, 6, 1) == "a, b, c, d, e, f"


def test_on_the_fly_text_equals_the_cache(tiny_dir, cached_run, tmp_path, caplog):
    """No reordering (keep_tokens covers every tag): the step's own encoding, dropped captions
    included, gives the cached path's losses and LoRA."""
    out = tmp_path / "fly"
    with caplog.at_level("INFO"):
        train(_cfg(cached_run / "cache", out, "--max_steps", "2", "--caption_dropout", "0.5",
                   "--shuffle_caption", "--keep_tokens", "9"))  # fmt: skip
    assert "text is encoded on the fly" in caplog.text and "--shuffle_caption" in caplog.text
    cached, fly = _rows(cached_run), _rows(out)
    assert [float(r["loss"]) for r in fly] == pytest.approx(
        [float(r["loss"]) for r in cached], rel=1e-5
    )
    # And directly: the step's conditioning equals the cache's, "" for a dropped caption.
    from sdxl.data.cached_dataset import CachedDataset

    data = CachedDataset(cached_run / "cache" / "latents", cached_run / "cache" / "text")
    text = StepText(tiny_dir, _cfg(cached_run, out), torch.device("cpu"), torch.float32)
    items = [data[i] for i in range(len(data)) if not data.is_flipped(i)]
    drop = torch.tensor([False, True, False, False])
    ids = text.token_ids([it["caption"] for it in items], len(items))
    got = text.conditioning({**ids, "drop_caption": drop})
    empty = data.empty_text()
    for key, k in (("prompt_embeds", 0), ("pooled", 1)):
        want = torch.stack([empty[k] if d else it[key] for it, d in zip(items, drop, strict=True)])
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_diffusers_loads_the_text_encoder_lora_with_our_effect(tiny_dir, te_run, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdxl.lora import split_lora_state
    from sdxl.lora_formats import load_lora_file
    from sdxl.text import encode_prompts, load_tokenizers
    from sdxl.text_lora import TEXT_ENCODERS, apply_component_loras
    from sdxl.weights import load_component

    lora = te_run[0] / "lora_final.safetensors"
    prompts = ["shape, red, round", "a blue square"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    base = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    theirs = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    encoders = [load_component(tiny_dir, n, model_cls=MODEL_CLASSES[n], dtype=torch.float32, device="cpu")
                for n in TEXT_ENCODERS]  # fmt: skip
    state, info = load_lora_file(lora, text_encoders=True)
    assert not info.ignored
    apply_component_loras(dict(zip(TEXT_ENCODERS, encoders, strict=True)),
                          [({k: v for k, v in state.items() if k.startswith("text_")}, 1.0)])  # fmt: skip
    ours = encode_prompts(load_tokenizers(tiny_dir), encoders, prompts)
    for k in (0, 2):  # prompt_embeds, pooled_prompt_embeds
        assert (theirs[k] - base[k]).abs().max() > 1e-3  # the LoRA has an effect
        torch.testing.assert_close(ours[k // 2], theirs[k], rtol=1e-4, atol=1e-5)
    # diffusers' own file of it (text_encoder.* keys) reads back as the same LoRA.
    from peft.utils import get_peft_model_state_dict

    layers = {f"{n}_lora_layers": get_peft_model_state_dict(m, adapter_name=next(iter(m.peft_config)))
              for n, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                           ("text_encoder_2", pipe.text_encoder_2))}  # fmt: skip
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, **layers)
    again, info = load_lora_file(tmp_path / "pytorch_lora_weights.safetensors", text_encoders=True)
    assert info.format == "peft" and not info.ignored
    want, got = split_lora_state(state), split_lora_state(again)
    assert want.keys() == got.keys()
    for path in want:
        torch.testing.assert_close(got[path].delta(), want[path].delta())


def test_generation_applies_the_text_encoder_lora(tiny_dir, te_run, tmp_path):
    """Merged and unmerged give the same image, which differs from the UNet part alone."""
    from sdxl.generate.run import GenerateConfig, load_generation_pipeline
    from sdxl.pipeline import SampleSettings

    lora = te_run[0] / "lora_final.safetensors"
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(lora)).items() if k.startswith("lora_unet_")},
              str(unet_only))  # fmt: skip

    def image(path: Path, merge: bool) -> np.ndarray:
        cfg = GenerateConfig(str(tiny_dir), str(tmp_path / "out"), ("shape, red, round",),
                             width=64, height=64, num_inference_steps=2, precision="fp32",
                             device="cpu", loras=((str(path), 1.0),), merge_loras=merge,
                             compile=False)  # fmt: skip
        pipe = load_generation_pipeline(cfg, "cpu")
        settings = SampleSettings(width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                                  sampler="euler", seed=1)  # fmt: skip
        out = pipe.generate(list(cfg.prompts), settings, indices=[0])
        return np.asarray(out[0], np.int16)

    merged, unmerged, plain = image(lora, True), image(lora, False), image(unet_only, True)
    assert np.abs(merged - unmerged).max() <= 1
    assert np.abs(merged - plain).max() > 2


def test_a_text_encoder_only_file_is_usable(tiny_dir, te_run, tmp_path):
    from sdxl.lora_formats import LoRAFileError, load_lora_file

    te_only = tmp_path / "te_only.safetensors"
    save_file({k: v for k, v in load_file(str(te_run[0] / "lora_final.safetensors")).items()
               if k.startswith("lora_te")}, str(te_only))  # fmt: skip
    state, _ = load_lora_file(te_only, text_encoders=True)
    assert {k.split(".")[0] for k in state} == {"text_encoder", "text_encoder_2"}
    with pytest.raises(LoRAFileError, match="text-encoder"):
        load_lora_file(te_only)  # UNet-only callers: as before


def test_the_workflow_config_carries_the_settings():
    """config.yaml documents them, the schema checks them, and the train_lora job's learned
    settings (every train key but the speed and validation ones) hold them."""
    import yaml

    from sdxl.train.config import RUNTIME_SETTINGS, VALIDATION_SETTINGS
    from sdxl.workflow_config import ConfigError, check_config

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    keys = ("train_text_encoder", "text_encoder_lr", "unet_lr", "shuffle_caption", "keep_tokens")
    assert {k: config["train"][k] for k in keys} == {k: getattr(TrainConfig("d"), k) for k in keys}
    schema = ROOT / "schemas" / "config.schema.yaml"
    edits = {"train_text_encoder": True, "text_encoder_lr": 5e-5, "unet_lr": 1e-4,
             "shuffle_caption": True, "keep_tokens": 2}  # fmt: skip
    config["train"].update(edits)
    check_config(config, schema)
    learned = {k: v for k, v in config["train"].items()
               if k not in {*RUNTIME_SETTINGS, *VALIDATION_SETTINGS, "gpus"}}  # fmt: skip
    cfg = TrainConfig.from_dict({**learned, "data_dir": "d"})
    assert {k: getattr(cfg, k) for k in keys} == edits
    for key, bad in (("keep_tokens", -1), ("text_encoder_lr", 0)):
        with pytest.raises(ConfigError, match=key):
            check_config({**config, "train": {**config["train"], key: bad}}, schema)


def test_validation_grids_use_the_text_encoder_lora(tiny_dir, te_run, tmp_path):
    """The CLI's grid of the last step (prompts re-encoded through the TE LoRA being trained)
    equals validate_run's grid of the final file, and differs from the UNet part's alone."""
    from PIL import Image

    from sdxl.train.validation import validate_run

    out = te_run[0]
    lora = out / "lora_final.safetensors"
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(lora)).items() if k.startswith("lora_unet_")},
              str(unet_only))  # fmt: skip
    samples = TrainConfig.from_dict(json.loads((out / "config.json").read_text())).samples
    validate_run({2: lora, 3: unet_only}, tiny_dir, samples, tmp_path / "grids")

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"), np.int16)

    cli, ours, plain = (pixels(p) for p in (out / "samples" / "step-0000002.png",
                                            tmp_path / "grids" / "step-0000002.png",
                                            tmp_path / "grids" / "step-0000003.png"))  # fmt: skip
    assert np.abs(cli - ours).max() <= 2
    assert np.abs(ours - plain).max() > 2
