"""Load SDXL weights from a diffusers folder or a single-file checkpoint, strictly.

Models are built on the meta device and receive the file's tensors with `assign=True`, so a
full SDXL never needs twice its size in memory and no random init is ever computed. Every
failure is a `WeightsError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sdxl import convert
from sdxl.errors import UserError
from sdxl.models.configs import BUILTIN_TINY, SDXL_BASE, VAEConfig
from sdxl.utils import atomic_path, to_dtype

COMPONENTS = convert.COMPONENTS
_STEMS = ("diffusion_pytorch_model", "model")  # diffusers, transformers file names
_EXPECTED_CLASS = {  # what config.json must declare for each component
    "unet": ("_class_name", "UNet2DConditionModel"),
    "vae": ("_class_name", "AutoencoderKL"),
    "text_encoder": ("architectures", "CLIPTextModel"),
    "text_encoder_2": ("architectures", "CLIPTextModelWithProjection"),
}
_REDOWNLOAD = "the file is incomplete or corrupt; delete it and download it again"
_NOT_BASE = (
    "not an SDXL base model; this library needs SDXL base 1.0 or a fine-tune of it, as a "
    "diffusers folder or a single-file .safetensors checkpoint"
)


class WeightsError(UserError):
    """Weights that cannot be loaded; the message names the file, the problem and the fix."""


# ----------------------------------------------------------------------------- files


def _open_error(path: Path, err: Exception) -> WeightsError:
    """Turn a safetensors/OS error into a message a user can act on."""
    return WeightsError(f"{path}: cannot read safetensors ({err}); {_REDOWNLOAD}")


def read_keys(path: str | Path) -> list[str]:
    """Tensor names in a `.safetensors` file, reading only its header."""
    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise _open_error(path, err) from None


def _existing_file(path: str | Path) -> Path:
    """The path, or a WeightsError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found; check the path or download the weights again")
    return path


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point tensors only (integer buffers keep their type)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_state_dict_file(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    keys: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read one `.safetensors` file onto `device`, casting floats to `dtype` tensor by tensor.

    `keys` optionally selects which tensors to read (others are never loaded).
    """
    path = _existing_file(path)
    dtype = to_dtype(dtype) if dtype is not None else None
    device = torch.device(device)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = f.keys()
            return {k: _cast(f.get_tensor(k), dtype) for k in names if keys is None or keys(k)}
    except (SafetensorError, OSError) as err:
        raise _open_error(path, err) from None


def _variant_files(stem: str, variant: str | None) -> tuple[str, str]:
    """(single file, shard index) names diffusers/transformers write for a variant."""
    if variant is None:
        return f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"


def _find_weights(folder: Path, variant: str | None) -> Path | None:
    """The single file or shard index for `variant` in `folder`, if any."""
    for stem in _STEMS:
        for name in _variant_files(stem, variant):
            if (folder / name).is_file():
                return folder / name
    return None


def find_component_weights(folder: str | Path, variant: str | None = None) -> Path:
    """Pick the weights of a component folder: fp32 first when `variant` is None, else exact."""
    folder = Path(folder)
    found = _find_weights(folder, variant)
    if found is None and variant is None:
        found = _find_weights(folder, "fp16")
    if found is not None:
        return found
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = f"{variant}-variant " if variant else ""
    hint = (
        "; only .bin weights were found: convert them to safetensors"
        if any(n.endswith(".bin") for n in present)
        else ""
    )
    raise WeightsError(
        f"{folder}: no {wanted}safetensors weights (found {present}){hint}; "
        "download the component again (download_weights.sh) or choose another variant"
    )


def _shard_paths(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index*.json` lists, checking that each exists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{index}: not a valid shard index ({err}); {_REDOWNLOAD}") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise WeightsError(
            f"{index}: {len(missing)} shard(s) listed in the index are missing, e.g. {missing[:3]}; "
            "download the component again"
        )
    return shards


def load_weights(
    path: Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read a single `.safetensors` file or every shard of a `*.index*.json`."""
    if not path.name.endswith(".json"):
        return load_state_dict_file(path, device, dtype)
    sd: dict[str, torch.Tensor] = {}
    for shard in _shard_paths(path):
        sd.update(load_state_dict_file(shard, device, dtype))
    return sd


def load_component_state_dict(
    folder: str | Path,
    variant: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read a component folder's weights (single file or every shard of an index)."""
    return load_weights(find_component_weights(folder, variant), device, dtype)


# ----------------------------------------------------------------------------- models


def _check_declared_class(name: str, config: dict, source: str) -> None:
    """Reject a config.json that declares another model class (e.g. a UNet config in vae/)."""
    field, want = _EXPECTED_CLASS[name]
    got = config.get(field)
    if got is None:
        return
    got_list = got if isinstance(got, list) else [got]
    if want not in got_list:
        raise WeightsError(
            f"{source}: {field}={got!r} but {name}/ must hold a {want} config; "
            "the folder is not an SDXL base model (or its components are mixed up)"
        )


def build_on_meta(name: str, model_cls: type[nn.Module], config: dict,
                  source: str = "config") -> nn.Module:  # fmt: skip
    """Build component `name` as a `model_cls` (its `config_class` reads config.json's dict) on
    the meta device (no memory, no init).

    The caller names the network class, so this module imports none: a job that loads only the
    VAE depends on sdxl/models/vae.py alone (the workflow derives its code inputs from imports).
    """
    _check_declared_class(name, config, source)
    try:
        cfg = model_cls.config_class.from_dict(config)
    except (ValueError, TypeError, KeyError) as err:
        raise WeightsError(
            f"{source}: unsupported {name} config ({err}); this library loads SDXL base "
            "components only: point it at an SDXL base model"
        ) from None
    with torch.device("meta"):
        return model_cls(cfg)


def _examples(keys: list[str]) -> str:
    """A few keys, enough to recognise the problem without flooding the terminal."""
    return ", ".join(sorted(keys)[:5])


def _check_keys(sd: dict, expected: dict, source: str, name: str) -> None:
    """Raise a WeightsError listing missing/unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {_examples(unexpected)})")
        raise WeightsError(
            f"{source}: the weights do not match the SDXL {name}: {'; '.join(parts)}. "
            "The file is from another model or is incomplete; download the component again"
        )
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in sd.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise WeightsError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape for the {name} config: "
            f"{'; '.join(wrong[:5])}. config.json does not describe these weights; use the "
            "config that came with them"
        )


def assign_state_dict(model: nn.Module, sd: dict, source: str, name: str) -> nn.Module:
    """Load `sd` strictly into a meta-device `model` by assignment; return it frozen in eval mode."""
    expected = model.state_dict()
    convert = getattr(type(model), "convert_state_dict", None)  # a network's key fix-ups
    sd = convert(sd) if convert else sd
    _check_keys(sd, expected, source, name)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"{type(model).__name__} keeps tensors outside its state dict: {left[:5]}"
        )
    return model.eval().requires_grad_(False)


_COMPONENT_CONFIG = ("every component folder needs its config.json (download the model again, "
                     "or pass a folder in diffusers layout)")  # fmt: skip
_VAE_CONFIG = ("pass an SDXL model folder (with vae/) or a VAE folder holding config.json and "
               "diffusion_pytorch_model.safetensors")  # fmt: skip


def _read_config(path: Path, missing: str = _COMPONENT_CONFIG) -> dict:
    """A component's config.json as a dict, or a WeightsError saying how to fix it (`missing`:
    what to do when there is none)."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing; {missing}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err}); download it again") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object; download it again")
    return config


def load_component(
    model_dir: str | Path,
    name: str,
    *,
    model_cls: type[nn.Module],
    dtype: str | torch.dtype | None,
    device: str | torch.device,
    variant: str | None = None,
) -> nn.Module:
    """Load `<model_dir>/<name>/` (diffusers layout) into a `model_cls` (e.g. AutoencoderKL for
    "vae"), strictly, frozen, in eval."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; expected one of {list(COMPONENTS)}")
    folder = Path(model_dir) / name
    if not folder.is_dir():
        raise WeightsError(
            f"{folder}: component folder not found; {model_dir} must be an SDXL model in "
            f"diffusers layout with {', '.join(COMPONENTS)} folders (download_weights.sh "
            "writes one), or pass a single-file .safetensors checkpoint"
        )
    config_path = folder / "config.json"
    model = build_on_meta(name, model_cls, _read_config(config_path), str(config_path))
    weights = find_component_weights(folder, variant)
    return assign_state_dict(model, load_weights(weights, device, dtype), str(weights), name)


def _vae_folder(model_dir: str | Path, vae_dir: str | Path | None) -> Path:
    """The folder with the VAE's config.json and weights: vae_dir (or its vae/) or model/vae."""
    if vae_dir is None:
        return Path(model_dir) / "vae"
    vae_dir = Path(vae_dir)
    return vae_dir / "vae" if (vae_dir / "vae" / "config.json").is_file() else vae_dir


def vae_scaling_factor(model_dir: str | Path, vae_dir: str | Path | None = None) -> float:
    """The latent scaling factor of the VAE load_vae loads, read from its config alone."""
    config = _read_config(_vae_folder(model_dir, vae_dir) / "config.json", _VAE_CONFIG)
    return float(config.get("scaling_factor", VAEConfig.scaling_factor))


def load_vae(
    model_dir: str | Path,
    vae_dir: str | Path | None = None,
    *,
    model_cls: type[nn.Module],
    device: str | torch.device,
    dtype: str | torch.dtype | None,
) -> nn.Module:
    """The model's VAE, or a separate one (e.g. sdxl-vae-fp16-fix: a folder with config.json
    and weights, or with vae/), as a `model_cls` (AutoencoderKL), strictly, frozen, in eval."""
    config = _vae_folder(model_dir, vae_dir) / "config.json"
    model = build_on_meta("vae", model_cls, _read_config(config, _VAE_CONFIG), str(config))
    weights = find_component_weights(config.parent)
    return assign_state_dict(model, load_weights(weights, device, dtype), str(weights), "vae")


# ----------------------------------------------------------------------------- checks, identity


def check_single_file(path: str | Path) -> Path:
    """Reject a single file that is not an SGM SDXL base `.safetensors`, reading its header only."""
    path = _existing_file(path)
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"{path}: only .safetensors single files are supported (pickled .ckpt/.pt files can "
            "run code); convert it to safetensors or download the .safetensors release"
        )
    try:
        convert.detect_architecture(read_keys(path))
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None
    return path


def check_model_folder(folder: str | Path) -> Path:
    """Reject a folder that is not a diffusers SDXL base model, reading model_index.json only.

    SD 1.x/2.x folders name another pipeline class; the refiner has no CLIP-L text encoder.
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightsError(
            f"{index}: missing, so {folder} is not a diffusers model folder; download the model "
            "again (download_weights.sh), or pass a single-file .safetensors checkpoint"
        )
    config = _read_config(index)
    name = config.get("_class_name")
    absent = [n for n in COMPONENTS if not isinstance(config.get(n), list) or None in config[n]]
    if not str(name).startswith("StableDiffusionXL") or absent:
        found = f"{name}" + (f" without {', '.join(absent)}" if absent else "")
        raise WeightsError(f"{folder}: {found} is {_NOT_BASE}")
    return folder


def check_model_source(source: str | Path) -> Path:
    """Cheap checks of a model before anything is loaded or downloaded; returns its path.

    Reads only model_index.json or a single file's header, so a wrong path, a file that is not
    a model, or another model family fails at once with one message (no Hub access first).
    """
    if str(source) == BUILTIN_TINY:  # the only source that loads sdxl/tiny.py
        from sdxl.tiny import ensure_tiny_sdxl

        return ensure_tiny_sdxl()
    path = Path(source)
    if path.is_file():
        return check_single_file(path)
    if path.is_dir():
        return check_model_folder(path)
    raise WeightsError(
        f"{path}: no such model folder or file; pass a diffusers SDXL folder "
        "(download_weights.sh writes one), a single-file .safetensors checkpoint, or builtin:tiny"
    )


def model_identity(source: str | Path) -> str:
    """A short fingerprint of the weights at `source` that changes when its files change.

    A folder with the weights stage's manifest.json (every file's sha256) is known by it and
    the files' sizes, the same on every machine. Otherwise: each file's name, size and
    modification time, since hashing gigabytes at every start would take minutes (a copy of
    the model elsewhere then counts as other weights).
    """
    path = check_model_source(source)
    root = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else model_files(path)
    manifest = path / "manifest.json"
    use_manifest = path.is_dir() and manifest.is_file()
    lines = [manifest.read_text()] if use_manifest else []
    for f in files:
        stat = f.stat()
        stamp = "" if use_manifest else f"\t{stat.st_mtime_ns}"
        lines.append(f"{f.relative_to(root)}\t{stat.st_size}{stamp}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder, without hidden ones (download caches, locks)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# ----------------------------------------------------------------------------- single file


def _single_file_configs(configs: dict | None, config_dir: str | Path | None) -> dict:
    """Component configs for a single file: explicit dicts, a diffusers folder, or SDXL base."""
    if configs is not None:
        return configs
    if config_dir is None:
        return SDXL_BASE
    return {n: _read_config(Path(config_dir) / n / "config.json") for n in COMPONENTS}


def _in_components(key: str) -> bool:
    """Keys of the four networks (EMA copies and schedule buffers are never read)."""
    return key.startswith(tuple(convert.SGM_PREFIXES.values()))


def load_single_file(
    path: str | Path,
    *,
    model_classes: dict[str, type[nn.Module]],
    dtype: str | torch.dtype | None,
    device: str | torch.device,
    configs: dict | None = None,
    config_dir: str | Path | None = None,
) -> dict[str, nn.Module]:
    """Load an SGM single-file SDXL `.safetensors` (A1111/ComfyUI format) into our four modules
    (`model_classes`: component name -> network class, sdxl.models.networks.MODEL_CLASSES).

    Configs come from `configs` (name -> config.json dict), else `config_dir` (a diffusers
    folder holding `<name>/config.json`), else SDXL base.
    """
    path = check_single_file(path)
    configs = _single_file_configs(configs, config_dir)
    sd = load_state_dict_file(path, device, dtype, keys=_in_components)
    try:
        parts = convert.sgm_to_diffusers(sd, configs)
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None
    del sd
    missing = [n for n in COMPONENTS if n not in parts]
    if missing:
        prefixes = [convert.SGM_PREFIXES[n] + "*" for n in missing]
        raise WeightsError(
            f"{path}: no weights for {missing} ({prefixes}); a full SDXL checkpoint with UNet, "
            "VAE and both text encoders is needed"
        )
    return {
        n: assign_state_dict(
            build_on_meta(n, model_classes[n], configs[n]), parts.pop(n), f"{path} [{n}]", n
        )
        for n in COMPONENTS
    }


def save_single_file(
    components: dict[str, dict[str, torch.Tensor]],
    path: str | Path,
    *,
    configs: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write diffusers component state dicts as one SGM `.safetensors` file, atomically."""
    sgm = convert.diffusers_to_sgm(components, configs)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sgm.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return Path(path)
