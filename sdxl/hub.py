"""Downloading SDXL from the Hugging Face Hub: only the files SDXL needs, resumable, retried.

The token comes from the `HF_TOKEN` environment variable only (never from a config file that
might be committed or logged).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
COMPONENT_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
CONFIG_FILES = ("scheduler/scheduler_config.json", "model_index.json")


def select_files(
    repo_files: list[str], variant: str | None = None, weights: bool = True
) -> list[str]:
    """The subset of a repo's files that a diffusers-layout SDXL needs.

    Tokenizers, configs and scheduler always; with `weights`, each component's safetensors in
    the asked variant (".fp16") including shards and their index. Falls back to the fp32 files
    for a component that has no such variant.
    """
    files = set(repo_files)
    chosen = sorted(f for f in files if f.split("/")[0] in ("tokenizer", "tokenizer_2"))
    for comp, stem in COMPONENT_WEIGHTS.items():
        chosen += [f"{comp}/config.json"] if f"{comp}/config.json" in files else []
        if weights:
            chosen += _component_weights(files, comp, stem, variant)
    return chosen + [f for f in CONFIG_FILES if f in files]  # model_index.json last: marks done


def _component_weights(files: set[str], comp: str, stem: str, variant: str | None) -> list[str]:
    for suffix in ([f".{variant}"] if variant else []) + [""]:
        single = f"{comp}/{stem}{suffix}.safetensors"
        index = f"{comp}/{stem}.safetensors.index{suffix}.json"
        if single in files:
            return [single]
        if index in files:
            shard_prefix = f"{comp}/{stem}-"
            shards = [
                f
                for f in files
                if f.startswith(shard_prefix) and f.endswith(f"{suffix}.safetensors")
            ]
            return [index, *sorted(shards)]
    raise FileNotFoundError(
        f"the repository has no safetensors weights for {comp}/ "
        f"(looked for {stem}{'.' + variant if variant else ''}.safetensors and shards); "
        "is it a diffusers-layout SDXL repository?"
    )


def download_sdxl(
    local_dir: str | Path,
    repo_id: str = SDXL_BASE_REPO,
    revision: str | None = None,
    variant: str | None = None,
    weights: bool = True,
    retries: int = 5,
) -> Path:
    """Download (or resume) the SDXL files into `local_dir`; existing complete files are kept."""
    from huggingface_hub import hf_hub_download, list_repo_files

    token = os.environ.get("HF_TOKEN") or None
    local_dir = Path(local_dir)
    repo_files = _retry(lambda: list_repo_files(repo_id, revision=revision, token=token), retries)
    for name in select_files(repo_files, variant, weights):
        log.info("fetching %s/%s", repo_id, name)
        _retry(
            lambda name=name: hf_hub_download(
                repo_id, name, revision=revision, local_dir=local_dir, token=token
            ),
            retries,
        )
    return local_dir


def _retry(fn, retries: int):
    """Call fn, retrying transient network errors with exponential backoff."""
    for attempt in range(retries):
        try:
            return fn()
        except (OSError, ConnectionError) as err:  # requests/httpx errors subclass OSError
            if attempt == retries - 1:
                raise RuntimeError(
                    f"download failed after {retries} attempts: {err}. Check the network, the repo "
                    "id and revision, and set HF_TOKEN if the repository is gated."
                ) from err
            wait = 2**attempt
            log.warning("download error (%s); retrying in %ss", err, wait)
            time.sleep(wait)


def fetch_config_files(local_dir: str | Path | None = None, repo_id: str = SDXL_BASE_REPO) -> Path:
    """Configs, tokenizers and scheduler of SDXL base (a few MB): what a single file lacks."""
    if local_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        local_dir = cache / "sdxl-pipeline" / "sdxl-base-1.0-configs"
    local_dir = Path(local_dir)
    if not (local_dir / "model_index.json").exists():
        download_sdxl(local_dir, repo_id=repo_id, weights=False)
    return local_dir
