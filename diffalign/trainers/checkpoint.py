"""Crash-safe checkpoint directories: stage, commit with a manifest, rename, then prune.

Layout under a checkpoint ``root``::

    step-00000010/            committed: holds COMMIT.json (the manifest, written last)
    .staging-step-00000020/   a save in progress (or killed); never read
    .replaced-step-00000010/  a committed dir moved aside while the same step is re-committed
    .deleting-step-00000005/  a pruned dir being removed

Protocol (`commit`): fsync every staged file while hashing it (sha256, 1 MiB chunks), write
``COMMIT.json`` atomically and last, atomically rename the staging dir to ``step-XXXXXXXX``,
fsync the root, and only then prune. A ``step-*`` dir therefore always holds its manifest, and a
SIGKILL at any point leaves the previous checkpoint or the new one, never a partial one. Old
checkpoints are renamed to ``.deleting-*`` before removal, so a kill mid-delete leaves only hidden
debris, which the next save removes.

Multi-process jobs: the main process calls `stage` (it empties the dir), then a barrier; every
process writes its own files into `staging_path(root, step)`; barrier; the main process calls `commit`.

Fault injection (`diffalign.faults`): ``DIFFALIGN_FAULT="checkpoint.after_files:2"`` SIGKILLs this process at the
2nd hit of that point. Points: ``checkpoint.write`` (the trainer calls it
between its own file writes), ``checkpoint.after_files``, ``checkpoint.before_rename``,
``checkpoint.after_move_aside``, ``checkpoint.after_rename``, ``checkpoint.prune``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

from diffalign.faults import fault_point
from diffalign.io import atomic_write_text, fsync_dir

MARKER = "COMMIT.json"
FORMAT = "diffalign-checkpoint"
FORMAT_VERSION = 1
_CHUNK = 1 << 20
_STEP_RE = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged, or cannot be written; the message names the path."""


def step_path(root: str | os.PathLike, step: int) -> Path:
    """Final directory of the checkpoint for ``step``."""
    return Path(root) / f"step-{step:08d}"


def staging_path(root: str | os.PathLike, step: int) -> Path:
    """Staging directory for ``step``: deterministic, so every process of a job can write into it."""
    return Path(root) / f".staging-step-{step:08d}"


def _step_of(path: Path, prefix: str = "") -> int | None:
    m = _STEP_RE.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
    return int(m.group(1)) if m else None


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _remove(path: Path) -> None:
    """Remove a directory by first renaming it to a hidden ``.deleting-*`` name (atomic), then rmtree."""
    trash = path.parent / f".deleting-{path.name.lstrip('.')}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def _recover(root: Path) -> None:
    """Hand an orphaned ``.replaced-step-N`` (killed mid re-commit) back to its empty ``step-N`` slot."""
    for old in root.glob(".replaced-step-*"):
        step = _step_of(old, ".replaced-")
        if step is None or step_path(root, step).exists() or not is_committed(old):
            continue
        try:
            os.replace(old, step_path(root, step))
            fsync_dir(root)
        except FileNotFoundError:  # another process of the job restored it first
            pass


def stage(root: str | os.PathLike, step: int) -> Path:
    """Create an empty staging dir for ``step`` (removing a stale one of that name) and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _recover(root)
    staging = staging_path(root, step)
    if staging.exists():
        _remove(staging)
    staging.mkdir()
    fsync_dir(root)
    return staging


def commit(
    root: str | os.PathLike, step: int, staging: str | os.PathLike, keep_last: int, protect: Iterable[Path] = ()
) -> Path:
    """Commit a staged checkpoint as ``step-XXXXXXXX``, then prune; returns the committed dir.

    Retention keeps the just-committed checkpoint, anything in ``protect`` (e.g. the one this run
    resumed from) and the newest other committed checkpoints up to ``keep_last`` in total. Leftover
    staging dirs of other steps and moved-aside or half-deleted dirs are removed.
    """
    root, staging = Path(root), Path(staging)
    if keep_last < 1:
        raise CheckpointError(f"{root}: keep_last must be >= 1, got {keep_last}")
    if not staging.is_dir() or staging.resolve().parent != root.resolve():
        raise CheckpointError(f"{staging}: staging dir missing or not directly inside {root}")
    if (staging / MARKER).exists():
        raise CheckpointError(f"{staging / MARKER}: staging dir already holds a commit marker")
    files = []
    for p in sorted(staging.rglob("*")):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise CheckpointError(f"{p}: only regular files and dirs may be checkpointed")
        if p.is_file():
            files.append({"path": p.relative_to(staging).as_posix(), "size": p.stat().st_size,
                          "sha256": _sha256(p, fsync=True)})
        else:
            fsync_dir(p)
    fsync_dir(staging)
    fault_point("checkpoint.after_files")
    now = time.time()
    record = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "created_unix": now,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "files": files}
    atomic_write_text(staging / MARKER, json.dumps(record, indent=1))
    fault_point("checkpoint.before_rename")
    final = step_path(root, step)
    _recover(root)
    if final.exists():  # same step re-reached after resuming from an older one: keep old until new is in
        aside = root / f".replaced-{final.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        fsync_dir(root)
        fault_point("checkpoint.after_move_aside")
    os.replace(staging, final)
    fsync_dir(root)
    fault_point("checkpoint.after_rename")
    _prune(root, final, keep_last, {Path(p).resolve() for p in protect})
    return final


def _prune(root: Path, final: Path, keep_last: int, protect: set[Path]) -> None:
    """Apply retention after a commit; unmarked ``step-*`` dirs were not made by us and are left alone."""
    _recover(root)
    committed = list_committed(root)
    kept = {final.resolve()} | (protect & {p.resolve() for p in committed})
    others = [p for p in reversed(committed) if p.resolve() not in kept]  # newest first
    doomed = others[max(0, keep_last - len(kept)):]
    debris = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name != f".staging-{final.name}"
              and p.name.startswith((".staging-", ".replaced-", ".deleting-"))]
    for path in doomed + debris:
        fault_point("checkpoint.prune")
        if path.name.startswith(".deleting-"):
            shutil.rmtree(path)
        else:
            _remove(path)


def is_committed(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a commit marker (its contents are not checked)."""
    return (Path(path) / MARKER).is_file()


def verify(path: str | os.PathLike) -> dict:
    """Check a checkpoint against its manifest (presence, size, sha256 of every file); return the record."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker}: commit marker missing; {path} is not a committed checkpoint")
    try:
        record = json.loads(marker.read_text("utf-8"))
        entries = [(e["path"], int(e["size"]), str(e["sha256"])) for e in record["files"]]
        if record["format"] != FORMAT or record["version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported format {record['format']!r} version {record['version']!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable commit marker ({type(e).__name__}: {e})") from e
    dir_step = _step_of(path)
    if dir_step is not None and record.get("step") != dir_step:
        raise CheckpointError(f"{marker}: records step {record.get('step')} but the dir is for step {dir_step}")
    for rel, size, sha in entries:
        f = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{marker}: unsafe file path {rel!r} in manifest")
        if not f.is_file():
            raise CheckpointError(f"{f}: file listed in {MARKER} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {size} recorded in {MARKER} (truncated?)")
        if _sha256(f) != sha:
            raise CheckpointError(f"{f}: sha256 does not match {MARKER} (corrupted)")
    return record


def list_committed(root: str | os.PathLike) -> list[Path]:
    """Committed ``step-*`` dirs under ``root``, sorted by step (oldest first); not verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _step_of(p) is not None and is_committed(p)]
    return sorted(dirs, key=_step_of)


def latest(root: str | os.PathLike, check: bool = True) -> Path | None:
    """The newest committed checkpoint, verified if ``check``; None if there is none.

    Staging and unmarked dirs are ignored. A newest committed checkpoint that fails verification
    raises `CheckpointError` naming the bad file: it never silently falls back to an older one.
    """
    root = Path(root)
    if root.is_dir():
        _recover(root)
    committed = list_committed(root)
    if not committed:
        return None
    if check:
        verify(committed[-1])
    return committed[-1]
