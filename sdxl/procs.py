"""Process hygiene for long jobs: one writer per output folder, and no process outliving its job.

- `folder_lock`: an exclusive `flock` on `<folder>/.lock`. The kernel drops it when the holder
  dies (kill -9 included), so a stale lock never blocks a rerun, and a second run into a folder
  that is still being written refuses with one line instead of writing beside the first.
- `die_with_parent`: a child (generation worker, torchrun, a DDP rank) is killed by the kernel
  when the process that started it dies (Linux `PR_SET_PDEATHSIG`), so killing a command kills
  its whole tree.
- `watch_ancestors`: for a job started by Snakemake, which cannot set that signal on the jobs it
  starts, a daemon thread ends the job when the Snakemake process above it is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sdxl.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_PR_SET_PDEATHSIG = 1


class FolderBusy(UserError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "this folder") -> Iterator[Path]:
    """Hold `<folder>/.lock` exclusively for the block; FolderBusy if another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderBusy(
                f"{folder}: another process (pid {holder}) is writing {what}; wait for it to "
                "finish or stop it, or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    `parent_pid`: the parent expected; if it already died before the request took effect
    (a race at start-up), exit now.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    if fields[0] in ("Z", "X"):  # a zombie is dead for our purpose
        return None
    return int(fields[1]), fields[19]


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its parent to reap it counts as gone)."""
    return _proc_stat(pid) is not None


def child_pids(pid: int) -> set[int]:
    """Every live process below `pid`, children of children too (from /proc's parent pids)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[0]
    found, todo = set(), [pid]
    while todo:
        pid = todo.pop()
        kids = {p for p, parent in parents.items() if parent == pid} - found
        found |= kids
        todo += kids
    return found


def _is_snakemake(pid: int) -> bool:
    """Whether the process runs snakemake itself (`snakemake ...`, `python [-m] snakemake ...`).

    The program is matched, not any word of the command line, so that a shell or launcher
    whose arguments merely mention snakemake (`uv run snakemake`, `bash run_snakemake.sh`)
    is not taken for it.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    names = [os.path.basename(a) for a in argv[:3]]
    if names[0] == "snakemake":
        return True
    return names[0].startswith("python") and (
        names[1:2] == ["snakemake"] or argv[1:3] == ["-m", "snakemake"]
    )


def snakemake_ancestors(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, start time) of this process's ancestors up to the outermost snakemake process.

    Empty when no ancestor is a snakemake process (or /proc is unavailable). A local job is a
    child of the snakemake it belongs to; a SLURM job step's script is a child of the
    `snakemake` that srun started, whose parent is slurmstepd.
    """
    chain, pid = [], os.getpid() if pid is None else pid
    last_snakemake = -1
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            break
        parent, _ = stat
        if parent <= 1:
            break
        parent_stat = _proc_stat(parent)
        if parent_stat is None:
            break
        chain.append((parent, parent_stat[1]))
        if _is_snakemake(parent):
            last_snakemake = len(chain)
        pid = parent
    return chain[:last_snakemake] if last_snakemake > 0 else []


def watch_ancestors(interval: float = 1.0, ancestors: list[tuple[int, str]] | None = None) -> bool:
    """End this process (and, through die_with_parent, its children) once an ancestor is gone.

    Watches the processes from this one up to the outermost snakemake above it. Returns False
    (watching nothing) when there is no such ancestor.
    """
    watched = snakemake_ancestors() if ancestors is None else ancestors
    if not watched:
        return False

    def watch() -> None:
        while True:
            time.sleep(interval)
            for pid, started in watched:
                stat = _proc_stat(pid)
                if stat is None or stat[1] != started:  # gone, or its pid was reused
                    log.error("process %d above this job is gone; stopping the job", pid)
                    os._exit(1)  # children started with die_with_parent follow

    threading.Thread(target=watch, name="watch-ancestors", daemon=True).start()
    return True
