"""The weights stage: any SDXL source -> one diffusers-layout model folder + manifest.json.

Sources: `builtin:tiny`, a Hugging Face repo id (only the files SDXL needs, optional fp16
variant, pinned revision, token from HF_TOKEN), a local diffusers folder, or a single-file
SGM `.safetensors` (the ComfyUI/A1111 format, converted here once). Large files are never
copied: Hub downloads stay in their (resumable) download folder and local files are
hard-linked (symlinked across file systems) into the model folder. The manifest lists every
file with its size and sha256, so a changed weight file is visible in one small JSON file.

Command line (what download_weights.sh runs):
    python -m sdxl.prepare --dir weights/sdxl-base-1.0 [--fp16] [--repo ID] [--revision REV]
    python -m sdxl.prepare --from-single-file model.safetensors --dir weights/my-model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sdxl import config_fields
from sdxl.cli.errors import add_debug_flag, one_line_errors
from sdxl.hub import SDXL_BASE_REPO, select_files
from sdxl.models.configs import BUILTIN_TINY
from sdxl.utils import atomic_path, atomic_write_text, sha256_file
from sdxl.weights import WeightsError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
VARIANTS = (None, "fp16")
_CONFIG_PARTS = ("tokenizer", "tokenizer_2", "scheduler")


@dataclass(frozen=True)
class WeightsConfig:
    """Where the SDXL weights come from (config.yaml's `weights` section)."""

    source: str = SDXL_BASE_REPO  # builtin:tiny, a Hub repo id, a diffusers folder or a file
    revision: str | None = None  # Hub branch, tag or commit (a commit hash pins the weights)
    variant: str | None = None  # "fp16": the half-precision files (half the download)
    download_dir: str | None = None  # Hub downloads land (and resume) here
    config_source: str | None = None  # single files: Hub id or folder with configs, tokenizers
    retries: int = 5

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"weights.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.retries < 1:
            raise ValueError(f"weights.retries must be at least 1, got {self.retries}")

    @classmethod
    def from_dict(cls, values: dict) -> WeightsConfig:
        """Build from config.yaml's `weights` dict; unknown keys are an error."""
        return config_fields.from_dict(cls, values, "weights settings")


def source_kind(source: str) -> str:
    """'tiny', 'folder', 'file' or 'hub' for a weights source string."""
    if source == BUILTIN_TINY:
        return "tiny"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if source.endswith(".safetensors") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"weights source {source}: no such file or folder")
    if source.count("/") == 1 and all(source.split("/")):
        return "hub"
    raise ValueError(
        f"weights source {source!r} is neither builtin:tiny, an existing folder or .safetensors "
        "file, nor a Hugging Face repo id such as stabilityai/stable-diffusion-xl-base-1.0"
    )


# ---------------------------------------------------------------------------------------------
# Files


def link_file(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src`: a hard link, else a symlink; never a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        dst.symlink_to(src.resolve())


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, POSIX style, skipping hidden files and folders."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def link_sdxl_files(src: Path, dst: Path, variant: str | None) -> list[str]:
    """Link the files of a diffusers folder that SDXL needs (one variant) into `dst`."""
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{src}: not a diffusers SDXL folder (no model_index.json); pass a folder written by "
            "save_pretrained or download_weights.sh, a single .safetensors file, or a Hub repo id"
        )
    files = select_files(list_files(src), variant)
    for name in files:
        link_file(src / name, dst / name)
    return files


def write_manifest(model_dir: Path, path: Path, cfg: WeightsConfig, kind: str) -> dict:
    """manifest.json: the source and every file of the model folder with size and sha256."""
    files = [
        {
            "file": name,
            "size": (model_dir / name).stat().st_size,
            "sha256": sha256_file(model_dir / name),
        }
        for name in list_files(model_dir)
        if (model_dir / name).resolve() != path.resolve()
    ]
    manifest = {
        "version": MANIFEST_VERSION,
        "source": cfg.source,
        "kind": kind,
        "revision": cfg.revision,
        "variant": cfg.variant,
        "files": files,
    }
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_manifest(model_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Raise if a file of the manifest is missing or has another size (a cheap integrity check)."""
    model_dir = Path(model_dir)
    manifest = json.loads(Path(path).read_text())
    bad = [
        f["file"]
        for f in manifest["files"]
        if not (model_dir / f["file"]).is_file()
        or (model_dir / f["file"]).stat().st_size != f["size"]
    ]
    if bad:
        raise WeightsError(
            f"{model_dir}: {len(bad)} file(s) missing or of the wrong size, e.g. {bad[:3]}; "
            "download or prepare the weights again"
        )


# ---------------------------------------------------------------------------------------------
# Sources


def _download(cfg: WeightsConfig, model_dir: Path) -> None:
    """Download (resumably) into download_dir, check sizes, link the SDXL files into model_dir.

    Under HF_HUB_OFFLINE=1 the files come from the Hugging Face cache instead (checked by
    their content hashes there), with no network access.
    """
    from sdxl.hub import download_sdxl, hub_offline

    target = Path(cfg.download_dir) if cfg.download_dir else model_dir
    folder = download_sdxl(target, cfg.source, cfg.revision, cfg.variant, retries=cfg.retries)
    if not hub_offline():
        files = select_files(list_files(folder), cfg.variant)
        verify_sizes(folder, hub_sizes(cfg.source, files, cfg.revision))
    if folder.resolve() != model_dir.resolve():
        link_sdxl_files(folder, model_dir, cfg.variant)


def hub_sizes(repo_id: str, files: list[str], revision: str | None) -> dict[str, int]:
    """The size of each of `files` in the Hub repository (one API call)."""
    from huggingface_hub import HfApi

    from sdxl.hub import hub_call

    token = os.environ.get("HF_TOKEN") or None
    infos = hub_call(
        lambda: HfApi().get_paths_info(repo_id, files, revision=revision, token=token),
        repo_id, revision, retries=3,
    )  # fmt: skip
    return {info.path: info.size for info in infos if getattr(info, "size", None) is not None}


def verify_sizes(folder: Path, sizes: dict[str, int]) -> None:
    """Raise naming the files whose local size differs from the expected one."""
    bad = [
        f"{name} ({(folder / name).stat().st_size if (folder / name).exists() else 'missing'} "
        f"!= {size} bytes)"
        for name, size in sorted(sizes.items())
        if not (folder / name).is_file() or (folder / name).stat().st_size != size
    ]
    if bad:
        raise WeightsError(
            f"{folder}: {len(bad)} downloaded file(s) are incomplete: {', '.join(bad[:3])}; "
            "delete them and run the download again (it resumes)"
        )


def config_folder(config_source: str | None, download_dir: str | None = None) -> Path:
    """A diffusers folder with configs, tokenizers and scheduler (no weights needed)."""
    from sdxl.hub import fetch_config_files

    if config_source is None:
        return fetch_config_files()
    if Path(config_source).is_dir():
        return Path(config_source)
    local = Path(download_dir) / "configs" if download_dir else None
    return fetch_config_files(local, repo_id=config_source)


def convert_single_file(path: Path, model_dir: Path, configs: Path) -> None:
    """Convert an SGM single-file SDXL into a diffusers folder (configs taken from `configs`)."""
    from safetensors.torch import save_file

    from sdxl.models.networks import MODEL_CLASSES
    from sdxl.weights import COMPONENTS, load_single_file

    modules = load_single_file(path, model_classes=MODEL_CLASSES, dtype=None, device="cpu",
                               config_dir=configs)  # fmt: skip
    for name in COMPONENTS:
        stem = "diffusion_pytorch_model" if name in ("unet", "vae") else "model"
        (model_dir / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(configs / name / "config.json", model_dir / name / "config.json")
        state = {k: v.contiguous() for k, v in modules.pop(name).state_dict().items()}
        with atomic_path(model_dir / name / f"{stem}.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    for part in _CONFIG_PARTS:
        shutil.copytree(configs / part, model_dir / part, dirs_exist_ok=True)
    shutil.copyfile(configs / "model_index.json", model_dir / "model_index.json")  # last: done


def prepare_weights(
    cfg: WeightsConfig, model_dir: str | os.PathLike, manifest: str | os.PathLike | None = None
) -> Path:
    """Fill `model_dir` from `cfg.source` and write the manifest (default model_dir/manifest.json)."""
    model_dir = Path(model_dir)
    manifest = Path(manifest) if manifest is not None else model_dir / "manifest.json"
    kind = source_kind(cfg.source)
    log.info("preparing %s weights from %s into %s", kind, cfg.source, model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tiny":
        from sdxl.tiny import write_tiny_sdxl

        write_tiny_sdxl(model_dir)
    elif kind == "hub":
        _download(cfg, model_dir)
    elif kind == "folder":
        link_sdxl_files(Path(cfg.source).expanduser(), model_dir, cfg.variant)
    else:
        convert_single_file(
            Path(cfg.source).expanduser(),
            model_dir,
            config_folder(cfg.config_source, cfg.download_dir),
        )
    write_manifest(model_dir, manifest, cfg, kind)
    log.info("wrote %s", manifest)
    return model_dir


def models_cache() -> Path:
    """Where commands keep the diffusers folders they make from Hub ids and single files."""
    root = os.environ.get("SDXL_CACHE_DIR")
    if root:
        return Path(root) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl-pipeline/models"


def model_folder(source: str, config_source: str | None = None) -> Path:
    """The diffusers-layout folder of a Hub repo id or a single .safetensors file, made as the
    weights stage makes it: downloaded (resumable) or converted once, into models_cache().

    The folder is reused while the file's size and mtime (or the repo id) are the same, and is
    made under a lock, atomically, so a killed or concurrent command never sees half of it.
    """
    from sdxl.procs import folder_lock

    kind = source_kind(source)
    if kind not in ("hub", "file"):
        raise ValueError(f"{source}: model_folder makes folders of Hub ids and single files only")
    if kind == "file":
        path = Path(source).expanduser().resolve()
        stat = path.stat()
        key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{config_source}"
        name = f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    else:
        name = source.replace("/", "--")
    target = models_cache() / name
    with folder_lock(target.parent / f".{name}", "this model's conversion"):
        if not (target / "manifest.json").is_file():
            log.info("making the diffusers folder of %s in %s (once)", source, target)
            staging = target.parent / f".{name}" / "model"
            shutil.rmtree(staging, ignore_errors=True)
            download = str(models_cache() / "downloads" / name) if kind == "hub" else None
            cfg = WeightsConfig(source=source, config_source=config_source, download_dir=download)
            prepare_weights(cfg, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_weights.sh",
        description="Download or prepare SDXL weights (diffusers layout).",
    )
    p.add_argument("--dir", default="weights/sdxl-base-1.0", help="model folder to fill")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--repo", default=SDXL_BASE_REPO, help="Hugging Face repo id")
    src.add_argument("--from-single-file", help="convert this SGM .safetensors file instead")
    src.add_argument("--from-folder", help="link the SDXL files of this diffusers folder")
    p.add_argument("--revision", default=None, help="branch, tag or commit hash to pin")
    p.add_argument("--fp16", action="store_true", help="the fp16 variant (half the download)")
    p.add_argument("--config-source", default=None,
                   help="single files: Hub id or folder with the configs/tokenizers (default SDXL base)")  # fmt: skip
    p.add_argument("--retries", type=int, default=5)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    source = args.from_single_file or args.from_folder or args.repo
    cfg = WeightsConfig(source=source, revision=args.revision, variant="fp16" if args.fp16 else None,
                        config_source=args.config_source, retries=args.retries)  # fmt: skip
    with one_line_errors(args.debug):  # one `error: ...` line (Hub, files, settings)
        out = prepare_weights(cfg, args.dir)
        check_manifest(out, out / "manifest.json")
    print(f"done: {out} (files listed with sizes and sha256 in {out / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
