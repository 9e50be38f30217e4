"""WebDataset shards of a finished dataset folder: tars of NNNNN.png + .txt + .json per image.

The images are generated into the folder as usual (resumable per image); the tars are packed
from it afterwards, `shard_size` images each, in index order: `shard-000000.tar`, ... Each tar is
written to a temp name and renamed, and records in a PAX global header a digest of what it holds
(each image's metadata and its PNG's size and mtime), so a rerun keeps a tar whose digest, member
list and end-of-archive are what is asked for, reading only its headers, and rewrites the others.
`shards.json` beside them lists the tars. Readers: `webdataset.WebDataset` and Hugging Face
`datasets.load_dataset("webdataset", data_files=...)`; the global header is invisible to both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

from sdxl.generate.writers import meta_text
from sdxl.utils import atomic_path, atomic_write_text, remove_stale_temps

log = logging.getLogger(__name__)

WEBDATASET_DIR = "webdataset"  # the tars' folder inside the dataset folder
INDEX = "shards.json"
FORMAT = "sdxl-pipeline webdataset 1"  # in every digest: a change of the tar layout rewrites all
DIGEST_KEY = "sdxl.digest"  # the PAX global header record holding the digest
_END = 2 * tarfile.BLOCKSIZE  # a tar ends with two zero blocks (padded to a record)


def tar_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def read_records(dataset_dir: Path) -> list[dict]:
    """The images' metadata from the dataset's metadata.jsonl, in index order."""
    lines = (dataset_dir / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def sample_members(dataset_dir: Path, meta: dict) -> list[tuple[str, bytes | Path]]:
    """(member name, bytes or file) of one sample: the PNG, its prompt and its metadata."""
    key = Path(meta["file_name"]).stem
    return [
        (f"{key}.png", dataset_dir / meta["file_name"]),
        (f"{key}.txt", meta["prompt"].encode("utf-8")),
        (f"{key}.json", json.dumps(meta, indent=2).encode("utf-8")),
    ]


def shard_digest(dataset_dir: Path, records: list[dict]) -> str:
    """What a tar of `records` holds: their metadata and each PNG's size and mtime (a PNG made
    again, even with the same metadata, is packed again)."""
    digest = hashlib.sha256(FORMAT.encode() + b"\n")
    for meta in records:
        stat = (dataset_dir / meta["file_name"]).stat()
        digest.update(f"{meta_text(meta)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_webdataset(dataset_dir: Path, out_dir: Path, shard_size: int) -> dict:
    """Pack the images of `dataset_dir` (per its metadata.jsonl) into tars in `out_dir`, keeping
    the tars that already hold what is asked for; returns the index written to shards.json."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    records = read_records(dataset_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    shards, written = [], 0
    for k, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start : start + shard_size]
        members = [m for meta in chunk for m in sample_members(dataset_dir, meta)]
        digest, path = shard_digest(dataset_dir, chunk), out_dir / tar_name(k)
        if not tar_holds(path, digest, [name for name, _ in members]):
            write_tar(path, members, digest)
            written += 1
        shards.append({"file": path.name, "first": chunk[0]["index"], "samples": len(chunk)})
    stale = [p for p in out_dir.glob("shard-*.tar") if p.name not in {s["file"] for s in shards}]
    for path in stale:
        path.unlink()
    log.info("webdataset %s: %d tar(s) written, %d kept, %d removed",
             out_dir, written, len(shards) - written, len(stale))  # fmt: skip
    index = {"format": FORMAT, "shard_size": shard_size, "samples": len(records),
             "urls": _brace_pattern(len(shards)), "shards": shards}  # fmt: skip
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def _brace_pattern(count: int) -> str:
    """The shards as one webdataset URL pattern, e.g. shard-{000000..000002}.tar."""
    if count <= 1:
        return tar_name(0)
    return f"shard-{{{0:06d}..{count - 1:06d}}}.tar"


def write_tar(path: Path, members: list[tuple[str, bytes | Path]], digest: str) -> None:
    """Write the tar atomically; member headers are fixed (mtime 0, mode 0644, no owner), so the
    same images give the same bytes."""
    headers = {DIGEST_KEY: digest}
    with (
        atomic_path(path) as tmp,
        tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, pax_headers=headers) as tar,
    ):
        for name, data in members:
            if isinstance(data, Path):
                data = data.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


def tar_holds(path: Path, digest: str, names: list[str]) -> bool:
    """Whether the tar at `path` is whole and holds exactly `names` with this digest.

    Reads the member headers only (seeking over the data). A tar cut short inside its last
    member still lists every member, so it must also end with its zero blocks.
    """
    try:
        with tarfile.open(path, "r:") as tar:
            held = [m.name for m in tar.getmembers()]
            recorded, end = tar.pax_headers.get(DIGEST_KEY), tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read()
    except (OSError, tarfile.TarError):  # missing, not a tar, damaged headers
        return False
    whole = len(tail) >= _END and not tail.strip(b"\0")
    return recorded == digest and held == names and whole


def remove_webdataset(out_dir: Path) -> None:
    """Remove the tars and their index (a folder rewritten in another format has none)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for path in [*out_dir.glob("shard-*.tar"), out_dir / INDEX]:
        path.unlink(missing_ok=True)
    remove_stale_temps(out_dir)
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
