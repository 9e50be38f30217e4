"""Turn --data_dir into caches: use a pipeline-built cache as is, or build one from raw images."""

from __future__ import annotations

import logging
from pathlib import Path

from sdxl.train.config import TrainConfig
from sdxl.train.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


def resolve_model_dir(source: str) -> Path:
    """A diffusers-layout folder for `source` (builtin:tiny is written on first use)."""
    from sdxl.tiny import BUILTIN_TINY, ensure_tiny_sdxl

    if source == BUILTIN_TINY:
        return ensure_tiny_sdxl()
    path = Path(source)
    if path.is_file():
        raise ValueError(
            f"{path}: training needs a diffusers-layout SDXL folder, not a single file; convert it "
            "with `download_weights.sh --from-single-file` or the pipeline's weights rule"
        )
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"{path}: not a diffusers SDXL folder (no model_index.json); download it with "
            "./download_weights.sh or pass --pretrained_model builtin:tiny to try the pipeline"
        )
    return path


def is_cache_dir(path: Path) -> bool:
    return (path / "latents" / "index.json").exists() and (path / "text" / "index.json").exists()


def prepare_caches(cfg: TrainConfig, dist: DistInfo) -> tuple[Path, Path, Path]:
    """(model folder, latent cache, text cache); rank 0 builds missing caches, others wait."""
    model_dir = resolve_model_dir(cfg.pretrained_model)
    data = Path(cfg.data_dir)
    if is_cache_dir(data):
        return model_dir, data / "latents", data / "text"
    if not data.is_dir():
        raise FileNotFoundError(f"--data_dir {data}: no such folder")
    cache = Path(cfg.output_dir) / "cache"
    if dist.is_main and not is_cache_dir(cache):
        _build(cfg, model_dir, data, cache, dist)
    barrier()
    return model_dir, cache / "latents", cache / "text"


def _build(cfg: TrainConfig, model_dir: Path, data: Path, cache: Path, dist: DistInfo) -> None:
    from sdxl.data.cache import build_latent_cache, build_text_cache
    from sdxl.data.dataset import validate_dataset, write_problems

    log.info("building caches for %s in %s", data, cache)
    result = validate_dataset(data, min_size=cfg.min_image_size,
                              policy="fail" if cfg.strict_data else "skip")  # fmt: skip
    write_problems(result, cache / "problems.tsv", cache / "problems.html")
    device = str(dist.device)
    dtype = "fp32" if dist.device.type == "cpu" else cfg.precision
    build_latent_cache(result.items, model_dir, cache / "latents", image_size=cfg.image_size,
                       random_crop=not cfg.center_crop, flip=cfg.random_flip, seed=cfg.seed,
                       batch_size=cfg.cache_batch_size, device=device, dtype="fp32",
                       vae_dir=cfg.vae_model)  # fmt: skip
    build_text_cache(result.items, model_dir, cache / "text", device=device, dtype=dtype)
