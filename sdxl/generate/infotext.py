"""AUTOMATIC1111's infotext: the PNG 'parameters' text that A1111, Forge and Civitai read.

The layout is the one A1111 1.9+ writes (`processing.create_infotext`): the prompt, then
`Negative prompt: ...` when there is one, then one line of `Key: value` pairs joined by ", ",
where a value holding a comma, colon or newline is JSON-quoted (`infotext_utils.quote`). A1111's
parser (`infotext_utils.parse_generation_parameters`) reads the last line as settings when it
holds at least three pairs, and every line before it as the prompt and negative prompt; it
strips each line, so a prompt round-trips unless one of its lines begins or ends with spaces or
begins with "Negative prompt:".

Samplers are named as A1111 1.9+ and Forge write and read them: the algorithm in `Sampler`
("DPM++ 2M") and the sigma schedule in `Schedule type` ("Karras"). Older A1111 wrote
"DPM++ 2M Karras" in one field; 1.9+ still reads that, but it cannot say "Euler" with Karras
sigmas, which we have. Hashes follow A1111 too: `Model hash` is the first 10 hex digits of a
file's sha256, each LoRA's in `Lora hashes` the first 12 of the sha256 of its safetensors tensor
data (kohya's "addnet" hash, which ignores the JSON header so editing metadata keeps it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Our sampler -> (A1111 sampler name, A1111 schedule type). "Automatic" is A1111's own default
# schedule for the sampler; "DDPM" is Forge's name (A1111 has no DDPM sampler).
SAMPLER_NAMES: dict[str, tuple[str, str]] = {
    "euler": ("Euler", "Automatic"),
    "euler_karras": ("Euler", "Karras"),
    "euler_a": ("Euler a", "Automatic"),
    "ddim": ("DDIM", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Automatic"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "ddpm": ("DDPM", "Automatic"),
}
PROGRAM = "sdxl-pipeline"


def quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def lora_alias(file_name: str) -> str:
    """The LoRA's name in `Lora hashes`: its file stem without ':' and ',' (as A1111 does)."""
    return Path(file_name).stem.replace(":", "").replace(",", "")


def model_name(source: str) -> str:
    """The `Model` field: the checkpoint's file stem (A1111), or the model folder's name."""
    path = Path(source)
    return path.stem if path.suffix in (".safetensors", ".ckpt") else path.name or source


def settings(meta: dict) -> dict[str, object]:
    """The settings line of image_meta `meta`, in A1111's key order; None values are left out."""
    sampler, schedule = SAMPLER_NAMES[meta["sampler"]]
    loras = meta.get("loras") or []
    hashes = ", ".join(f"{lora_alias(x['file'])}: {x['a1111_hash']}" for x in loras)
    code = meta.get("code")
    return {
        "Steps": meta["steps"],
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": meta["cfg_scale"],
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        "Model hash": meta.get("model_hash"),
        "Model": model_name(meta["model"]),
        "Lora hashes": hashes or None,
        "Version": f"{PROGRAM} {code}" if code else PROGRAM,
    }


def infotext(meta: dict) -> str:
    """A1111's 'parameters' text for the image whose image_meta is `meta`."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in settings(meta).items() if v is not None)
    negative = (
        f"\nNegative prompt: {meta['negative_prompt']}" if meta.get("negative_prompt") else ""
    )
    return f"{meta['prompt']}{negative}\n{line}".strip()


# ----------------------------------------------------------------------------- hashes


def safetensors_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts (after the 8-byte length and the header);
    0 for a file too short for its header (not safetensors: the LoRA loader says so)."""
    with open(path, "rb") as f:
        head = f.read(8)
    offset = 8 + int.from_bytes(head, "little") if len(head) == 8 else 0
    return offset if offset <= path.stat().st_size else 0


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: 12 hex digits of the sha256 of the safetensors tensor data (of
    the whole file for other formats, as A1111 does)."""
    from sdxl.utils import sha256_file  # (torch; this module is imported by light ones)

    path = Path(path)
    offset = safetensors_data_offset(path) if path.suffix == ".safetensors" else 0
    return sha256_file(path, offset)[:12]


def model_short_hash(source: str | Path) -> str:
    """The `Model hash` of the weights at `source`: A1111's 10-hex-digit file hash.

    A single-file checkpoint gets exactly A1111's hash (Civitai knows the public ones). A
    diffusers folder has no single file, so it is the hash of the UNet weights file (for sharded
    weights, of their index), taken from the manifest.json in or beside the folder when the
    weights stage or download_weights.sh wrote one, else computed (once per run: seconds per GB).
    """
    from sdxl.weights import check_model_source, find_component_weights

    path = check_model_source(source)
    if path.is_file():
        return _hash_file(path)[:10]
    unet = find_component_weights(path / "unet")
    name, size = unet.relative_to(path).as_posix(), unet.stat().st_size
    for manifest in (path / "manifest.json", path.parent / "manifest.json"):
        files = json.loads(manifest.read_text()).get("files", []) if manifest.is_file() else []
        for entry in files:
            if entry.get("file") == name and entry.get("size") == size:
                return entry["sha256"][:10]
    return _hash_file(unet)[:10]


def _hash_file(path: Path) -> str:
    from sdxl.utils import sha256_file

    size = path.stat().st_size
    if size > 1 << 30:
        log.info("hashing %s (%.1f GB) for the A1111 'Model hash'", path, size / 2**30)
    return sha256_file(path)
