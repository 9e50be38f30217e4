"""Which files a Hub download fetches, and the one-line errors when it cannot (the Hub itself
is not reachable from tests: its functions are monkeypatched to raise its real exceptions)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from sdxl import hub
from sdxl.hub import select_files

# The file list of stabilityai/stable-diffusion-xl-base-1.0 (abridged to the relevant kinds).
REPO = [
    ".gitattributes", "README.md", "LICENSE.md", "model_index.json", "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx", "text_encoder/flax_model.msgpack", "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_2/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer_2/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/openvino_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx",
]  # fmt: skip


def test_fp32_selection_is_exactly_what_sdxl_needs():
    got = select_files(REPO)
    weights = [f for f in got if f.endswith(".safetensors")]
    assert weights == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ]
    assert got[-1] == "model_index.json"
    assert "scheduler/scheduler_config.json" in got and "tokenizer_2/vocab.json" in got
    assert not any(
        f.startswith(("vae_1_0", "vae_decoder")) or f.endswith((".onnx", ".bin")) for f in got
    )


def test_fp16_variant_and_configs_only():
    got = select_files(REPO, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    assert not any(f.endswith(".safetensors") for f in select_files(REPO, weights=False))


def test_sharded_weights_are_fetched_with_their_index():
    repo = [f for f in REPO if not f.startswith("unet/diffusion")] + [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    got = select_files(repo)
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in got
    assert "unet/diffusion_pytorch_model-00002-of-00002.safetensors" in got


def test_repo_without_weights_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="unet/"):
        select_files([f for f in REPO if not f.startswith("unet/diffusion")])


# ---------------------------------------------------------------------------------------------
# Failures: the real huggingface_hub exception classes, raised by monkeypatched Hub calls

TOKEN = "hf_NeverInAnyMessage0123456789"


def _http():
    """The HTTP client module huggingface_hub uses (httpx or its successor)."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0])


def _hub_error(cls, status: int, url="https://huggingface.co/api/models/someone/sdxl"):
    http = _http()
    response = http.Response(status, request=http.Request("GET", url))
    return cls(f"{status} Client Error for url: {url}", response=response)


@pytest.fixture
def online(monkeypatch):
    """The Hub looks reachable, HF_TOKEN is set, and no retry waits."""
    monkeypatch.setattr(hub, "check_reachable", lambda repo_id: None)
    monkeypatch.setattr(hub.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def _listing_fails(monkeypatch, err) -> list:
    calls = []

    def list_repo_files(*args, **kwargs):
        calls.append(args)
        raise err

    monkeypatch.setattr("huggingface_hub.list_repo_files", list_repo_files)
    return calls


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and TOKEN not in text
    return text


def test_unreachable_hub_is_one_line_with_the_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # refused
    calls = _listing_fails(monkeypatch, AssertionError("must not be reached"))
    with pytest.raises(hub.HubError) as excinfo:
        hub.download_sdxl(tmp_path, "someone/sdxl", retries=5)
    text = _one_line(excinfo)
    assert text.startswith("cannot reach the Hugging Face Hub (http://127.0.0.1:9)")
    for way in ("someone/sdxl", "weights.source", "HF_HUB_OFFLINE=1", "download_weights.sh"):
        assert way in text
    assert calls == []  # failed at once, no retries


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (lambda: _hub_error(GatedRepoError, 401),
         "someone/sdxl is a gated repository and HF_TOKEN has no access: accept its licence"),
        (lambda: _hub_error(RepositoryNotFoundError, 404),
         "someone/sdxl: no such repository on the Hugging Face Hub, or it is private"),
        (lambda: _hub_error(RevisionNotFoundError, 404),
         "someone/sdxl has no revision 'v9'; set weights.revision"),
    ],
    ids=["gated", "missing-repo", "wrong-revision"],
)  # fmt: skip
def test_errors_no_retry_can_fix_are_one_line_at_once(
    online, monkeypatch, tmp_path, error, message
):
    calls = _listing_fails(monkeypatch, error())
    with pytest.raises(hub.HubError) as excinfo:
        hub.download_sdxl(tmp_path, "someone/sdxl", revision="v9", retries=5)
    assert message in _one_line(excinfo) and len(calls) == 1


def test_gated_repo_without_token_says_to_set_it(online, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    _listing_fails(monkeypatch, _hub_error(GatedRepoError, 401))
    with pytest.raises(hub.HubError, match="HF_TOKEN is not set.*export HF_TOKEN="):
        hub.download_sdxl(tmp_path, "someone/sdxl")


def test_interrupted_download_is_retried_and_then_resumes(online, monkeypatch, tmp_path):
    """A connection lost mid-file is retried; when it stays lost, one line says a rerun resumes
    (and the files already fetched stay)."""
    http = _http()
    monkeypatch.setattr("huggingface_hub.list_repo_files", lambda *a, **k: REPO)
    lost = {"unet/diffusion_pytorch_model.safetensors": 1, "text_encoder/model.safetensors": 99}

    def hf_hub_download(repo_id, name, revision=None, local_dir=None, token=None):
        assert token == TOKEN
        if lost.get(name, 0) > 0:
            lost[name] -= 1
            raise http.ReadError("connection reset by peer")
        (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / name).write_text(name)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    with pytest.raises(hub.HubError) as excinfo:
        hub.download_sdxl(tmp_path, "someone/sdxl", retries=3)
    text = _one_line(excinfo)
    assert "failed after 3 attempt(s): connection reset by peer" in text and "resumes" in text
    assert (tmp_path / "unet/diffusion_pytorch_model.safetensors").is_file()  # retried, fetched
    assert not (tmp_path / "model_index.json").exists()  # fetched last: the folder is not done
    lost.clear()  # the network is back: the rerun completes
    assert hub.download_sdxl(tmp_path, "someone/sdxl") == tmp_path
    assert (tmp_path / "model_index.json").is_file()


def test_offline_without_a_cached_copy_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(hub.HubError) as excinfo:
        hub.download_sdxl(tmp_path / "download", "someone/sdxl")
    assert "HF_HUB_OFFLINE=1 but the Hugging Face cache holds no copy of someone/sdxl" in (
        _one_line(excinfo)
    )


def test_a_bug_is_not_retried_or_disguised(online, monkeypatch, tmp_path):
    calls = _listing_fails(monkeypatch, TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        hub.download_sdxl(tmp_path, "someone/sdxl", retries=5)
    assert len(calls) == 1
