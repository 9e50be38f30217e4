"""The marker a workflow generate job leaves (`shard-K.json`): which images it holds, made with
which parameters (a digest of their metadata), and how fast; assemble and the report read it.

Apart from sdxl/generate/assemble.py so that a generate job does not load the dataset code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdxl.errors import UserError
from sdxl.generate.run import GenerateConfig, image_meta
from sdxl.generate.writers import meta_text
from sdxl.utils import atomic_write_text


def images_digest(records: list[dict]) -> str:
    """sha256 of the images' metadata (image_meta of each): equal iff they are the same images."""
    digest = hashlib.sha256()
    for meta in records:
        digest.update(meta_text(meta).encode() + b"\n")
    return digest.hexdigest()


def write_shard_marker(path: Path, cfg: GenerateConfig, indices: range, *, made: int,
                       seconds: float, device: str, peak_mem_gb: float | None) -> None:  # fmt: skip
    """What a generate job leaves for assemble and the report: its images and its speed."""
    marker = {
        "shard": Path(path).stem.removeprefix("shard-"),
        "folder": str(cfg.output_dir),
        "start": indices.start,
        "stop": indices.stop,
        "files": [f"{cfg.file_stem(i)}.png" for i in indices],
        "digest": images_digest([image_meta(cfg, i) for i in indices]),
        "code_version": cfg.code_version,
        "made": made,
        "reused": len(indices) - made,
        "seconds": round(seconds, 3),
        "images_per_s": round(made / seconds, 4) if made and seconds > 0 else None,
        "device": device,
        "peak_mem_gb": peak_mem_gb,
    }
    atomic_write_text(path, json.dumps(marker, indent=1) + "\n")


def read_markers(paths: list[Path], records: list[dict]) -> list[dict]:
    """The markers, each checked to hold the images asked for (`records`: their image_meta);
    together exactly 0..n-1."""
    markers = sorted((json.loads(Path(p).read_text()) | {"path": str(p)} for p in paths),
                     key=lambda m: m["start"])  # fmt: skip
    expected = 0
    for m in markers:
        if m["start"] != expected:
            raise UserError(f"{m['path']}: starts at image {m['start']}, expected {expected}; "
                            "rerun snakemake to regenerate the shards")  # fmt: skip
        expected = m["stop"]
    if expected != len(records):
        raise UserError(f"the generate shards hold {expected} images, {len(records)} asked "
                        "for; rerun snakemake to make the missing ones")  # fmt: skip
    for m in markers:
        if m["digest"] != images_digest(records[m["start"] : m["stop"]]):
            raise UserError(f"{m['path']}: its images were made with other parameters than "
                            "config.yaml asks for; rerun snakemake to regenerate them")  # fmt: skip
    return markers
