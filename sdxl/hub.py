"""Downloading SDXL from the Hugging Face Hub: only the files SDXL needs, resumable, retried.

The token comes from the `HF_TOKEN` environment variable only (never from a config file that
might be committed or logged).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from functools import partial
from pathlib import Path

from sdxl.errors import UserError, one_line

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


class HubError(UserError):
    """The Hub did not give us the files; the message says why and what to do instead."""


def ways_out(repo_id: str) -> str:
    """What to do where this machine cannot download: every way that needs no Hub access."""
    return (
        f"ways out: download on a machine with network (e.g. a login node: ./download_weights.sh "
        f"--repo {repo_id} --dir weights/sdxl) and set weights.source to that folder; or fill "
        f"the Hugging Face cache there (hf download {repo_id}) and run here with "
        "HF_HUB_OFFLINE=1; or set HTTPS_PROXY if this network needs a proxy"
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: use the Hugging Face cache only, never the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_reachable(repo_id: str, timeout: float = 10.0) -> None:
    """One quick request to the Hub; HubError with the ways out if it cannot be reached.

    Without it an offline node spends ~25 s in huggingface_hub's own retries and ends in a
    30-frame traceback of the HTTP client.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # any failure of the HTTP client (httpx, requests): unreachable
        raise HubError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to download {repo_id}: "
            f"{one_line(err)}; {ways_out(repo_id)}"
        ) from None


def download_sdxl(
    local_dir: str | Path,
    repo_id: str = SDXL_BASE_REPO,
    revision: str | None = None,
    variant: str | None = None,
    weights: bool = True,
    retries: int = 5,
) -> Path:
    """Download (or resume) the SDXL files into `local_dir`; existing complete files are kept.

    Returns the folder that holds the files: `local_dir`, or under HF_HUB_OFFLINE=1 the
    repository's snapshot in the Hugging Face cache (nothing is downloaded then).
    """
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    if hub_offline():
        cached = partial(snapshot_download, repo_id, revision=revision, local_files_only=True)
        return Path(hub_call(cached, repo_id, revision))
    check_reachable(repo_id)
    token = os.environ.get("HF_TOKEN") or None
    local_dir = Path(local_dir)
    listing = partial(list_repo_files, repo_id, revision=revision, token=token)
    for name in select_files(hub_call(listing, repo_id, revision, retries), variant, weights):
        log.info("fetching %s/%s", repo_id, name)
        fetch = partial(
            hf_hub_download, repo_id, name, revision=revision, local_dir=local_dir, token=token
        )
        hub_call(fetch, repo_id, revision, retries)
    return local_dir


def hub_call(fn, repo_id: str, revision: str | None = None, retries: int = 1):
    """Call fn (a Hub request); retry network and server errors with exponential backoff.

    Errors a retry cannot fix (gated or missing repository, unknown revision, a file missing
    from the offline cache) and the last failure become one-line HubErrors naming the repo
    and the fix. An interrupted file download resumes where it stopped on the next attempt
    or the next run (huggingface_hub keeps the partial file in the download folder).
    """
    for attempt in range(retries):
        try:
            return fn()
        except Exception as err:  # sorted below: permanent, transient, or a bug (re-raised)
            problem = _permanent_problem(err, repo_id, revision)
            if problem is not None:
                raise HubError(problem) from None
            if not isinstance(err, _transient_errors()):
                raise
            if attempt == retries - 1:
                raise HubError(
                    f"downloading {repo_id} failed after {retries} attempt(s): "
                    f"{one_line(err)}; the files fetched so far are kept, so a rerun "
                    f"resumes (raise weights.retries for a flaky network; {ways_out(repo_id)})"
                ) from None
            wait = 2**attempt
            log.warning("download error (%s); retrying in %ss", one_line(err), wait)
            time.sleep(wait)


def _permanent_problem(err: Exception, repo_id: str, revision: str | None) -> str | None:
    """The one-line explanation of an error no retry can fix, or None."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(err, GatedRepoError):  # before its base class RepositoryNotFoundError
        token = (
            "HF_TOKEN is not set" if not os.environ.get("HF_TOKEN") else "HF_TOKEN has no access"
        )
        return (
            f"{repo_id} is a gated repository and {token}: accept its licence on "
            f"https://huggingface.co/{repo_id} and export HF_TOKEN=<a read token of that account>"
        )
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{repo_id}: no such repository on the Hugging Face Hub, or it is private; check "
            "weights.source (owner/name), and export HF_TOKEN if it is private"
        )
    if isinstance(err, RevisionNotFoundError):
        return (
            f"{repo_id} has no revision {revision!r}; set weights.revision to one of its "
            "branches, tags or commit hashes (or null for main)"
        )
    if hub_offline() and isinstance(err, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return (
            f"HF_HUB_OFFLINE=1 but the Hugging Face cache holds no copy of {repo_id}{rev}: "
            f"fill it on a machine with network (hf download {repo_id}), with the same HF_HOME, "
            "or unset HF_HUB_OFFLINE"
        )
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return f"the Hub refused access to {repo_id} ({status}): check HF_TOKEN and its rights"
    return None


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network and server errors worth a retry: OSError (huggingface_hub's HTTP errors are
    OSErrors) plus the transport errors of whichever HTTP client it uses."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def fetch_config_files(local_dir: str | Path | None = None, repo_id: str = SDXL_BASE_REPO) -> Path:
    """Configs, tokenizers and scheduler of SDXL base (a few MB): what a single file lacks."""
    if local_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        local_dir = cache / "sdxl-pipeline" / "sdxl-base-1.0-configs"
    local_dir = Path(local_dir)
    if (local_dir / "model_index.json").exists():
        return local_dir
    return download_sdxl(local_dir, repo_id=repo_id, weights=False)
