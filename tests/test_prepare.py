"""The weights stage: every kind of source becomes one diffusers folder plus a manifest."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from sdxl.prepare import WeightsConfig, check_manifest, prepare_weights, source_kind
from sdxl.utils import sha256_file
from sdxl.weights import COMPONENTS, WeightsError, load_component_state_dict, save_single_file


def _manifest(path):
    return {f["file"]: f for f in json.loads(path.read_text())["files"]}


def test_builtin_tiny_writes_the_model_and_a_manifest(tmp_path):
    model = prepare_weights(
        WeightsConfig(source="builtin:tiny"), tmp_path / "model", tmp_path / "m.json"
    )
    files = _manifest(tmp_path / "m.json")
    assert "unet/diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
    entry = files["vae/config.json"]
    assert entry["size"] == (model / "vae/config.json").stat().st_size
    assert entry["sha256"] == sha256_file(model / "vae/config.json")
    check_manifest(model, tmp_path / "m.json")
    (model / "vae/config.json").write_text("{}")
    with pytest.raises(WeightsError, match="vae/config.json"):
        check_manifest(model, tmp_path / "m.json")


def test_local_folder_is_linked_not_copied(tiny_dir, tmp_path):
    source = shutil.copytree(tiny_dir, tmp_path / "source")
    (source / "unet/notes.md").write_text("not a model file")
    model = prepare_weights(WeightsConfig(source=str(source)), tmp_path / "model")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert os.path.samefile(model / weights, source / weights)
    assert not (model / "unet/notes.md").exists()
    assert weights in _manifest(model / "manifest.json")
    assert "manifest.json" not in _manifest(model / "manifest.json")


def test_single_file_is_converted_with_configs_from_a_folder(tiny_dir, tmp_path):
    original = {n: load_component_state_dict(tiny_dir / n) for n in COMPONENTS}
    single = save_single_file(original, tmp_path / "tiny.safetensors")
    cfg = WeightsConfig(source=str(single), config_source=str(tiny_dir))
    model = prepare_weights(cfg, tmp_path / "model")
    for name in COMPONENTS:
        converted = load_component_state_dict(model / name)
        assert converted.keys() == original[name].keys()
        assert all(torch.equal(converted[k], original[name][k]) for k in converted)
    assert (model / "tokenizer_2/vocab.json").is_file() and (model / "model_index.json").is_file()


def test_hub_download_is_checked_and_linked(fake_hub, tmp_path):
    cfg = WeightsConfig(source="someone/sdxl-finetune", download_dir=str(tmp_path / "download"))
    model = prepare_weights(cfg, tmp_path / "model", tmp_path / "m.json")
    name = "text_encoder_2/model.safetensors"
    assert os.path.samefile(model / name, tmp_path / "download" / name)
    assert json.loads((tmp_path / "m.json").read_text())["source"] == "someone/sdxl-finetune"
    fake_hub.sizes[name] += 1  # the Hub says the file is longer: an interrupted download
    with pytest.raises(WeightsError, match="incomplete"):
        prepare_weights(cfg, tmp_path / "model2")


def test_offline_node_uses_a_prefilled_hugging_face_cache(tiny_dir, tmp_path, monkeypatch):
    """The way out for a node without network: HF_HUB_OFFLINE=1 and the cache filled elsewhere
    (`hf download`); nothing is requested from the Hub."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache/models--someone--sdxl-finetune"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("sdxl.hub.check_reachable", lambda repo_id: pytest.fail("went online"))
    cfg = WeightsConfig(source="someone/sdxl-finetune", download_dir=str(tmp_path / "download"))
    model = prepare_weights(cfg, tmp_path / "model", tmp_path / "m.json")
    name = "unet/diffusion_pytorch_model.safetensors"
    assert os.path.samefile(model / name, repo / "snapshots" / commit / name)
    assert _manifest(tmp_path / "m.json")[name]["size"] == (tiny_dir / name).stat().st_size


def test_source_kinds_and_errors(tmp_path):
    assert source_kind("builtin:tiny") == "tiny"
    assert source_kind("stabilityai/stable-diffusion-xl-base-1.0") == "hub"
    assert source_kind(str(tmp_path)) == "folder"
    with pytest.raises(FileNotFoundError, match="no such file"):
        source_kind(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="repo id"):
        source_kind("not a source")
    with pytest.raises(ValueError, match="unknown weights settings"):
        WeightsConfig.from_dict({"source": "builtin:tiny", "token": "x"})
    with pytest.raises(ValueError, match="variant"):
        WeightsConfig(variant="fp8")
