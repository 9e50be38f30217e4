"""Small helpers shared by the whole library: dtype names, atomic file writes, temp cleanup,
file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name ('bf16', 'fp32', ...) or a torch.dtype to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)  # read the process umask (the only way) and put it back at once
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A killed job never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp (and safetensors' save_file, whatever the file had) make 0600 files: give the
        # mode open() would give, so other accounts (ComfyUI on a shared cluster) can read it.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temp files of atomic writes that a killed process left in `folder`.

    Call it only while holding the folder's lock (sdxl.procs.folder_lock): a live writer's
    temp file is then impossible. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    removed = []
    for path in found:
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sha256_file(path: str | os.PathLike, offset: int = 0, chunk: int = 1 << 24) -> str:
    """sha256 of the file's bytes from `offset` on, read in chunks (models are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
