"""Turn --data_dir into caches: use a pipeline-built cache as is, or build one from raw images.

A cache built in output_dir/cache is keyed by everything that decides its content: the cache
settings, the model files that encode it (VAE, text encoders, tokenizers: name, size, mtime)
and every dataset file's relative path, size and mtime (a cheap scan, nothing decoded). The
key goes into cache/inputs.json before the build starts, so:
- same inputs, finished cache: reused;
- same inputs, build killed half way: resumed shard by shard (the shards check their items);
- other inputs (an edited caption, a new image, another --image_size or VAE, or a cache of an
  older version without inputs.json): deleted and rebuilt from scratch, with one log line
  saying what changed.
The digest of the key is recorded in every checkpoint (see loop.Trainer._resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl.errors import UserError
from sdxl.train.config import TrainConfig
from sdxl.train.distributed import DistInfo, barrier
from sdxl.train.hooks import pause_point
from sdxl.utils import atomic_write_text

log = logging.getLogger(__name__)

INPUTS = "inputs.json"
INPUTS_VERSION = 1
# The model folders whose files decide the cached latents and text embeddings.
CACHE_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
MAX_NAMED = 3  # changed files named in a log line


@dataclass(frozen=True)
class Caches:
    """The caches a run trains on, `data_key`: what made them (recorded in checkpoints), and
    `expect`: the latent settings the run needs of them (CachedDataset checks them)."""

    model_dir: Path
    latent_dir: Path
    text_dir: Path
    data_key: dict  # {"digest": str, "settings": {TrainConfig field: value}}
    expect: dict  # {latent setting: value}, see expected_latents


@dataclass(frozen=True)
class CacheBuild:
    """A build rank 0 must do: the new key, the validated items, and why."""

    inputs: dict
    result: object  # sdxl.data.dataset.ValidationResult
    reason: str


def resolve_model_dir(source: str, config_source: str | None = None) -> Path:
    """A diffusers-layout SDXL folder for `source`: a folder, builtin:tiny (written on first
    use), a Hub repo id (downloaded) or a single .safetensors file (converted once; tokenizers
    and configs from `config_source`, default SDXL base's), as generation and the weights stage
    take them.

    Only model_index.json or a file's header is read first, so a wrong path, random bytes or
    another model family fail at once with one message, before anything is loaded or fetched.
    """
    from sdxl.prepare import model_folder, source_kind
    from sdxl.weights import WeightsError, check_model_source

    try:
        kind = source_kind(source)
    except (FileNotFoundError, ValueError):
        kind = None  # not there: check_model_source says so, as for any bad path
    try:
        if kind == "hub":
            return check_model_source(model_folder(source, config_source))
        path = check_model_source(source)
        return check_model_source(model_folder(source, config_source)) if path.is_file() else path
    except WeightsError as err:
        raise WeightsError(f"--pretrained_model: {err}") from None


def is_cache_pair(path: Path) -> bool:
    """A folder holding a finished latent cache in latents/ and text cache in text/."""
    from sdxl.data.cached_dataset import is_cache_dir

    return is_cache_dir(path / "latents", "latents") and is_cache_dir(path / "text", "text")


# --------------------------------------------------------------------------- the key


def cache_settings(cfg: TrainConfig, dist: DistInfo) -> dict:
    """The settings that decide the cache, named as TrainConfig fields (+ the text dtype)."""
    subsets = {"subsets": [asdict(s.captions) | {"image_dir": s.image_dir} for s in cfg.subsets]}
    return {
        **(subsets if cfg.subsets else {}),  # their caption rules: plain folders keep old keys
        "image_size": cfg.image_size,
        "center_crop": cfg.center_crop,
        "random_flip": cache_flips(cfg),
        "seed": cfg.seed,
        "min_image_size": cfg.min_image_size,
        "strict_data": cfg.strict_data,
        "vae_model": cfg.vae_model is not None,  # which VAE: its files are in "model"
        "text_dtype": text_dtype(cfg, dist),
    }


def cache_flips(cfg: TrainConfig) -> bool:
    """Whether mirrored latents are cached: when any subset trains with flips."""
    return any(plan.flip for plan in cfg.subset_plans)


def expected_latents(cfg: TrainConfig, pipeline: bool) -> dict:
    """The latent settings the run needs: of a pipeline-built cache only its image size (the
    buckets; how its items are visited is the run's), of one built here also crop, flips, seed."""
    from sdxl.data.latent_cache import sample_settings

    if pipeline:
        return {"image_size": cfg.image_size}
    return sample_settings(cfg.image_size, not cfg.center_crop, cache_flips(cfg), cfg.seed)


def text_dtype(cfg: TrainConfig, dist: DistInfo) -> str:
    return "fp32" if dist.device.type == "cpu" else cfg.precision


def file_stats(root: Path, rels: list[Path]) -> dict[str, list[int]]:
    """{relative POSIX path: [size, mtime_ns]} of files under root (a cheap change detector)."""
    return {rel.as_posix(): _stat(root / rel) for rel in rels}


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _folder_stats(folder: Path, prefix: str) -> dict[str, list[int]]:
    from sdxl.weights import model_files

    files = [p.relative_to(folder) for p in model_files(folder)]
    return {f"{prefix}/{k}": v for k, v in file_stats(folder, files).items()}


def model_stats(model_dir: Path, vae_model: str | None) -> dict[str, list[int]]:
    """Stats of the files that encode the cache: the VAE (or --vae_model), encoders, tokenizers."""
    stats = {}
    for name in CACHE_COMPONENTS:
        if name == "vae" and vae_model is not None:
            stats.update(_folder_stats(Path(vae_model), "vae_model"))
        elif (model_dir / name).is_dir():
            stats.update(_folder_stats(model_dir / name, name))
    return stats


def cache_inputs(cfg: TrainConfig, model_dir: Path, dist: DistInfo) -> dict:
    """Everything that decides a cache built from the raw folder data_dir (or the subsets)."""
    return {
        "version": INPUTS_VERSION,
        "settings": cache_settings(cfg, dist),
        "model": model_stats(model_dir, cfg.vae_model),
        "dataset": dataset_stats(cfg),
    }


def dataset_stats(cfg: TrainConfig) -> dict[str, list[int]]:
    """Stats of every image and caption file the cache is built from."""
    from sdxl.data.dataset import scan_dataset

    if cfg.subsets:
        from sdxl.dataset_config import subset_files

        return {key: _stat(path) for key, path in subset_files(cfg.subsets).items()}
    data = Path(cfg.data_dir)
    images, captions = scan_dataset(data)
    return file_stats(data, images + captions)


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def describe_change(old: dict | None, new: dict) -> str:
    """What differs between two cache keys, in a few words (for the log and warnings)."""
    if not isinstance(old, dict) or old.get("version") != new.get("version"):
        return "no key of this version (an older or unfinished cache)"
    parts = changed_settings(old.get("settings", {}), new["settings"])
    for section in ("model", "dataset"):
        a, b = old.get(section, {}), new[section]
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        edited = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        for what, names in (("added", added), ("removed", removed), ("changed", edited)):
            if names:
                shown = ", ".join(names[:MAX_NAMED]) + (", ..." if len(names) > MAX_NAMED else "")
                parts.append(f"{section}: {len(names)} file(s) {what} ({shown})")
    return "; ".join(parts) or "nothing"


def changed_settings(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]  # fmt: skip


def _read_inputs(cache: Path) -> dict | None:
    try:
        return json.loads((cache / INPUTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- plan and build


def uses_pipeline_cache(cfg: TrainConfig) -> bool:
    """data_dir is a cache the pipeline built (then subsets only say how to visit its items)."""
    return bool(cfg.data_dir) and is_cache_pair(Path(cfg.data_dir))


def _check_sources(cfg: TrainConfig) -> None:
    if not cfg.subsets:
        _check_data_dir(Path(cfg.data_dir))
    for k, subset in enumerate(cfg.subsets):
        if not Path(subset.image_dir).is_dir():
            raise UserError(f"subset #{k + 1}: image_dir {subset.image_dir} is not a folder; "
                            "fix the path in the dataset config")  # fmt: skip


def _check_data_dir(data: Path) -> None:
    if not data.exists():
        raise UserError(f"--data_dir {data}: no such folder; pass your image+caption folder")
    if not data.is_dir():
        raise UserError(f"--data_dir {data}: not a folder; pass your image+caption folder")


def plan_caches(cfg: TrainConfig, model_dir: Path, dist: DistInfo) -> CacheBuild | None:
    """The build rank 0 must do, or None when the caches can be used as they are.

    Read-only, so bad data fails here before anything is written to output_dir: the dataset
    is validated now (every image decoded) when a build is needed, and an empty or all-bad
    folder is a UserError.
    """
    if uses_pipeline_cache(cfg) or not dist.is_main:
        return None
    _check_sources(cfg)
    cache = Path(cfg.output_dir) / "cache"
    inputs = cache_inputs(cfg, model_dir, dist)
    old = _read_inputs(cache)
    if old == inputs and is_cache_pair(cache):
        return None
    if old == inputs:
        reason = "resuming an unfinished build"
    else:
        reason = "no cache yet" if not cache.exists() else describe_change(old, inputs)
    return CacheBuild(inputs, _validate(cfg), reason)


def _validate(cfg: TrainConfig):
    from sdxl.data.dataset import DatasetError
    from sdxl.dataset_config import validate_data

    options = {"min_size": cfg.min_image_size, "policy": "fail" if cfg.strict_data else "skip",
               "skip_hint": "drop --strict_data to skip them"}  # fmt: skip
    try:
        return validate_data(cfg.data_dir, cfg.subsets, **options)
    except DatasetError as err:
        raise UserError(str(err)) from None


def prepare_caches(
    cfg: TrainConfig, model_dir: Path, build: CacheBuild | None, dist: DistInfo
) -> Caches:
    """Build (rank 0, under the output lock) what `plan_caches` found missing; all ranks wait."""
    data = Path(cfg.data_dir)
    pipeline = uses_pipeline_cache(cfg)
    folder = data if pipeline else Path(cfg.output_dir) / "cache"
    if build is not None:
        _build(cfg, model_dir, build, folder, dist)
    barrier()
    if pipeline:
        key = {"digest": digest([_index_bytes(data, k) for k in ("latents", "text")]),
               "settings": {}}  # fmt: skip
    else:
        inputs = _read_inputs(folder)
        key = {"digest": digest(inputs), "settings": inputs["settings"]}
    expect = expected_latents(cfg, pipeline)
    return Caches(model_dir, folder / "latents", folder / "text", key, expect)


def _index_bytes(folder: Path, kind: str) -> str:
    return (folder / kind / "index.json").read_text(encoding="utf-8")


def _build(cfg: TrainConfig, model_dir: Path, build: CacheBuild, cache: Path, dist) -> None:
    """Write the key first, then the caches (resumable shard by shard under the same key)."""
    from sdxl.data.dataset import write_problems
    from sdxl.data.latent_cache import build_latent_cache
    from sdxl.data.text_cache import build_text_cache

    if _read_inputs(cache) != build.inputs and cache.exists():
        log.info("rebuilding the cache in %s: %s", cache, build.reason)
        shutil.rmtree(cache)
    else:
        log.info("building caches for %s in %s (%s)", build.result.data_dir, cache, build.reason)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache / INPUTS, json.dumps(build.inputs, indent=1))
    write_problems(build.result, cache / "problems.tsv", cache / "problems.html")
    items, device = build.result.items, str(dist.device)
    build_latent_cache(items, model_dir, cache / "latents", image_size=cfg.image_size,
                       random_crop=not cfg.center_crop, flip=cache_flips(cfg), seed=cfg.seed,
                       batch_size=cfg.cache_batch_size, device=device, dtype="fp32",
                       vae_dir=cfg.vae_model)  # fmt: skip
    pause_point("cache")
    build_text_cache(items, model_dir, cache / "text", device=device, dtype=text_dtype(cfg, dist))
