"""One writer per directory: an advisory lock that keeps two processes from building the same cache or training
into the same output directory at once.

`directory_lock(folder, what)` takes an exclusive ``flock`` on ``folder/.diffalign.lock`` without waiting; if
another process holds it, `DirectoryInUseError` says who (pid, host, command, since when) and what to do. The lock
belongs to the open file, so the kernel drops it when the process exits, SIGKILL included: there is never a stale
lock to delete by hand. The file holds the holder's description while it is held and is emptied on release (a
killed holder's description stays until the next holder overwrites it; it is only read while locked). Taking a lock
this process already holds shares it (a nested writer, e.g. the cache build then its scoring).

``flock`` is advisory and local: it keeps diffalign processes apart on one machine and on filesystems that
propagate it (local disks, most Lustre and recent NFS mounts); on a filesystem that ignores it the lock
always succeeds, as before. Windows has no ``fcntl``: there too it always succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".diffalign.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [lock file descriptor (None without fcntl), holders in this process]


class DirectoryInUseError(RuntimeError):
    """Another process is writing to this directory (a cache being built, an output directory being trained into)."""


def _holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}), since {since}"


def _acquire(folder: Path, what: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return None
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryInUseError(f"{what}: {folder} is in use by {holder}; wait for it to finish or choose another directory "
                                  "(the lock is released when that process exits)") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv[:3])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.ftruncate(fd, 0)  # released cleanly: no holder to describe
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def directory_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the exclusive lock of `folder` (created if missing) for the block; `what` names the directory in the
    error, e.g. ``"data.cache_dir"``. Holders in one process share the lock, released when the last one exits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key not in _HELD:
        _HELD[key] = [_acquire(folder, what), 0]
    entry = _HELD[key]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0 and _HELD.get(key) is entry:
            del _HELD[key]
            _release(entry[0])
