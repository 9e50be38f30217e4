"""Writing generated images: the seed's flat numbered layout, one atomic file at a time."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdxl.generate.infotext import infotext
from sdxl.generate.png_meta import META_KEY, recorded_meta, recorded_texts
from sdxl.utils import atomic_path, atomic_write_text

_ITEM = re.compile(r"(\d+)\.(png|txt|json)")  # the numbered files a dataset folder holds


def parameters_text(meta: dict) -> str:
    """A1111's 'parameters' text (see sdxl.generate.infotext), made from the image's metadata."""
    return infotext(meta)


def meta_text(meta: dict) -> str:
    """The JSON stored in the PNG: compared as text to decide whether an image is done."""
    return json.dumps(meta, sort_keys=True)


def save_png(image: Image.Image, path: Path, meta: dict) -> None:
    """Save a PNG carrying its generation parameters (A1111 'parameters' + JSON 'sdxl')."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text(META_KEY, meta_text(meta))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def is_done(path: Path, meta: dict) -> bool:
    """True when `path` is a whole PNG made with exactly the parameters in `meta`, whose
    A1111 text is today's (an image from before a change of that format is made again)."""
    return recorded_texts(path) == (meta_text(meta), parameters_text(meta))


def sync_sidecars(out_dir: Path, stem: str, meta: dict, caption: bool, save_json: bool) -> None:
    """Make NNNNN.txt / NNNNN.json say what `meta` says, and remove the ones not wanted.

    Files that already hold the right text are left alone (a resume rewrites nothing).
    """
    wanted = {
        out_dir / f"{stem}.txt": meta["prompt"] if caption else None,
        out_dir / f"{stem}.json": json.dumps(meta, indent=2) if save_json else None,
    }
    for path, text in wanted.items():
        if text is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            atomic_write_text(path, text)


def write_item(
    out_dir: Path, stem: str, image: Image.Image, meta: dict, save_json: bool, caption: bool = True
) -> None:
    """Write NNNNN.txt, optional NNNNN.json, then NNNNN.png last (its presence marks done)."""
    sync_sidecars(out_dir, stem, meta, caption, save_json)
    save_png(image, out_dir / f"{stem}.png", meta)


def is_item_name(name: str) -> bool:
    """Whether `name` is a numbered dataset file (NNNNN.png, .txt or .json)."""
    return _ITEM.fullmatch(name) is not None


def remove_foreign_items(out_dir: Path, wanted: set[int], width: int) -> list[Path]:
    """Delete the numbered files (NNNNN.png/.txt/.json) that are no image of this dataset.

    `wanted`: the indices the folder holds, `width`: their zero-padding. Others are left by an
    earlier run with more images (or another zero-padding); a fresh folder would not have them.
    A numbered PNG without our metadata is someone else's file: it and its sidecars stay.
    """
    stale: dict[str, list[Path]] = {}
    for path in out_dir.iterdir():
        match = _ITEM.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        stem = match[1]
        if len(stem) != width or int(stem) not in wanted:
            stale.setdefault(stem, []).append(path)
    removed = []
    for stem, paths in stale.items():
        png = out_dir / f"{stem}.png"
        if png.exists() and recorded_meta(png) is None:
            continue
        for path in paths:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class BackgroundWriter:
    """Runs writes (PNG encoding is most of their time) on a few threads while the caller
    makes the next batch, so the GPU does not wait for zlib.

    At most `max_pending` writes are queued or running; `submit` blocks beyond that, so memory
    stays flat. The first failed write is raised, as its own exception, by the next `submit` or
    by leaving the block, so the command fails with its usual one-line error. Leaving the block
    waits for every write (callers finalize a dataset only after all its images exist). Writes
    stay atomic, so a crash leaves at most temp files that the next run removes. `threads=0`
    writes synchronously in the caller.
    """

    def __init__(self, threads: int = 2, max_pending: int = 4) -> None:
        self._pool = ThreadPoolExecutor(threads, "image-writer") if threads > 0 else None
        self._slots = threading.BoundedSemaphore(max(max_pending, 1))
        self._pending: list[Future] = []

    def submit(self, write: Callable[..., None], *args, **kwargs) -> None:
        """Queue write(*args, **kwargs); raise first if an earlier write failed."""
        self._raise_failed()
        if self._pool is None:
            write(*args, **kwargs)
            return
        self._slots.acquire()
        future = self._pool.submit(write, *args, **kwargs)
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)

    def _raise_failed(self) -> None:
        """Forget finished writes, raising the exception of the first one that failed."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Wait for all writes; on an error in the block, drop the queued ones and re-raise it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            for future in self._pending:
                future.result()
