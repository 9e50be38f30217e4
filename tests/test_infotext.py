"""The PNG 'parameters' text reads back in AUTOMATIC1111 as what we generated with.

A1111 is not a package, so its reader is restated here from its documented rules
(modules/infotext_utils.py: `re_param`, `unquote`, `parse_generation_parameters`, 1.9+): the last
line holds the settings when it has at least three `Key: value` pairs, every line before it is
stripped and belongs to the prompt until one starting with "Negative prompt:", a quoted value is
JSON, and a `WxH` value becomes `Key-1` and `Key-2`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl.generate.infotext import (
    SAMPLER_NAMES,
    infotext,
    lora_short_hash,
    model_short_hash,
)
from sdxl.sampling.samplers import SAMPLERS

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict:
    """A1111's parse_generation_parameters, without its UI defaults and style matching."""
    res, prompt, negative, in_negative = {}, [], [], False
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"], res["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    for key, value in RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = RE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size[1], size[2]
        else:
            res[key] = value
    return res


def lora_hashes(value: str) -> dict[str, str]:
    """A 'Lora hashes' value as A1111 and Civitai split it: 'name: hash, name: hash'."""
    return dict(pair.split(": ", 1) for pair in value.split(", "))


def _meta(**kw) -> dict:
    base = {
        "prompt": "a red circle",
        "negative_prompt": "",
        "seed": 7,
        "sampler": "euler",
        "steps": 30,
        "cfg_scale": 7.5,
        "width": 1024,
        "height": 768,
        "model": "/models/sd_xl_base_1.0.safetensors",
        "model_hash": "31e35c80fc",
    }
    return {**base, **kw}


def test_the_layout_is_a1111s():
    """Key order, quoting and the Lora hashes value exactly as A1111 1.9+ writes them."""
    meta = _meta(negative_prompt="blurry", sampler="dpmpp_2m_karras", code="0123abcd",
                 loras=[{"file": "my_style.safetensors", "a1111_hash": "a1b2c3d4e5f6"}])  # fmt: skip
    assert infotext(meta) == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 7, "
        'Size: 1024x768, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "my_style: '
        'a1b2c3d4e5f6", Version: sdxl-pipeline 0123abcd'
    )
    assert infotext(_meta()).split("\n") == [
        "a red circle",  # no negative prompt: no line for it
        "Steps: 30, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.5, Seed: 7, "
        "Size: 1024x768, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: sdxl-pipeline",
    ]


PROMPTS = {
    "plain": ("a red circle", ""),
    "commas-and-colons": ("a cat, (masterpiece:1.2), Steps: 5, Seed: 1", "ugly, bad: hands"),
    "quotes": ('a sign saying "hello, world"', 'no "text", no \\ backslash'),
    "newlines": ("line one, red\nline two: blue\nSteps: 3, Sampler: x, Seed: 9", "bad\nworse, x"),
    "unicode": ("ein Hund, café — 猫", "schlecht"),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("prompts", list(PROMPTS))
def test_every_field_round_trips_through_a1111s_parser(sampler, prompts):
    prompt, negative = PROMPTS[prompts]
    loras = [{"file": "style,v2:final.safetensors", "a1111_hash": "0123456789ab"},
             {"file": "lora_final.safetensors", "a1111_hash": "ba9876543210"}]  # fmt: skip
    meta = _meta(prompt=prompt, negative_prompt=negative, sampler=sampler, seed=123456789,
                 cfg_scale=5.0, loras=loras, model="results/weights/model")  # fmt: skip
    got = a1111_parse(infotext(meta))
    name, schedule = SAMPLER_NAMES[sampler]
    assert got["Prompt"] == prompt
    assert got["Negative prompt"] == negative
    assert (got["Sampler"], got["Schedule type"]) == (name, schedule)
    assert int(got["Steps"]) == 30 and int(got["Seed"]) == 123456789
    assert float(got["CFG scale"]) == 5.0
    assert (got["Size-1"], got["Size-2"]) == ("1024", "768")
    assert got["Model hash"] == "31e35c80fc" and got["Model"] == "model"
    # A1111 drops ':' and ',' from the alias, as the value's own separators
    assert lora_hashes(got["Lora hashes"]) == {"stylev2final": "0123456789ab",
                                               "lora_final": "ba9876543210"}  # fmt: skip
    assert got["Version"] == "sdxl-pipeline"


def test_sampler_names_are_a1111s():
    assert SAMPLER_NAMES.keys() == SAMPLERS.keys()
    # names A1111 1.9+ lists (Forge for DDPM) and the schedule types it knows
    assert {n for n, _ in SAMPLER_NAMES.values()} == {
        "Euler",
        "Euler a",
        "DDIM",
        "DPM++ 2M",
        "DDPM",
    }
    assert {s for _, s in SAMPLER_NAMES.values()} == {"Automatic", "Karras"}
    assert all((s == "Karras") == k.endswith("_karras") for k, (_, s) in SAMPLER_NAMES.items())


def test_lora_hash_is_a1111s_hash_of_the_tensor_data(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, a, metadata={"ss_output_name": "a"})
    save_file(tensors, b, metadata={"ss_output_name": "a much longer name", "x": "y"})
    data = a.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert lora_short_hash(a) == hashlib.sha256(data[header:]).hexdigest()[:12]
    assert lora_short_hash(a) == lora_short_hash(b)  # metadata edits keep it, as in A1111
    assert lora_short_hash(a) != hashlib.sha256(data).hexdigest()[:12]
    pt = tmp_path / "lora_final.pt"
    pt.write_bytes(b"not safetensors")
    assert lora_short_hash(pt) == hashlib.sha256(b"not safetensors").hexdigest()[:12]


def test_model_hash_is_of_the_checkpoint_file_or_the_unet_file(tiny_dir, tmp_path):
    from sdxl.weights import find_component_weights

    unet = find_component_weights(tiny_dir / "unet")
    assert model_short_hash(tiny_dir) == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    # a manifest beside or in the folder (weights stage, download_weights.sh) is trusted
    model = tmp_path / "weights/model"
    shutil.copytree(tiny_dir, model)
    name = unet.relative_to(tiny_dir).as_posix()
    entry = {"file": name, "size": unet.stat().st_size, "sha256": "f" * 64}
    (tmp_path / "weights/manifest.json").write_text(json.dumps({"files": [entry]}))
    assert model_short_hash(model) == "f" * 10
    entry["size"] += 1  # a manifest of other files is not
    (tmp_path / "weights/manifest.json").write_text(json.dumps({"files": [entry]}))
    assert model_short_hash(model) == model_short_hash(tiny_dir)


def test_generated_png_reads_back_and_old_texts_are_remade(tiny_dir, tmp_path):
    from sdxl.generate.dataset import generate_dataset
    from sdxl.generate.run import GenerateConfig, pending_indices
    from sdxl.generate.writers import save_png
    from sdxl.lora import LoRAConfig, inject_lora, lora_state_dict
    from sdxl.lora_formats.kohya import save_kohya
    from sdxl.models.configs import TINY, UNetConfig
    from sdxl.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"]))
    inject_lora(unet, LoRAConfig(rank=2, alpha=2.0), generator=torch.Generator().manual_seed(0))
    lora = tmp_path / "my_lora.safetensors"
    save_kohya(lora, lora_state_dict(unet))
    cfg = GenerateConfig(pretrained_model=str(tiny_dir), output_dir=str(tmp_path / "out"),
                         prompts=("a cat, sitting: on a mat",), negative_prompt="dull, grey",
                         width=64, height=64, num_inference_steps=1, sampler="dpmpp_2m_karras",
                         seed=11, device="cpu", loras=((str(lora), 0.5),))  # fmt: skip
    assert generate_dataset(cfg, 1) == 1
    png = tmp_path / "out/00000.png"
    with Image.open(png) as im:
        got, meta = a1111_parse(im.text["parameters"]), json.loads(im.text["sdxl"])
    assert got["Prompt"] == "a cat, sitting: on a mat" and got["Negative prompt"] == "dull, grey"
    assert (got["Sampler"], got["Schedule type"], got["Seed"]) == ("DPM++ 2M", "Karras", "11")
    assert got["Model hash"] == meta["model_hash"] == model_short_hash(tiny_dir)
    assert lora_hashes(got["Lora hashes"]) == {"my_lora": lora_short_hash(lora)}
    with safe_open(lora, "pt") as f:  # what A1111 reads from kohya's header, when present
        assert lora_short_hash(lora) == f.metadata()["sshs_model_hash"][:12]
    # An image whose A1111 text is not today's (an older format) is made again, once.
    assert pending_indices(cfg, [0]) == []
    with Image.open(png) as im:
        pixels = im.copy()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 1, Sampler: dpmpp_2m_karras, Seed: 11")
    info.add_text("sdxl", json.dumps(meta, sort_keys=True))
    pixels.save(png, pnginfo=info)
    assert pending_indices(cfg, [0]) == [0]
    save_png(pixels, png, meta)  # what the rerun writes
    assert pending_indices(cfg, [0]) == []
