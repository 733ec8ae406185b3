"""Safe file I/O: atomic writes and loaders that never unpickle arbitrary objects.

Every writer goes through a temporary file in the destination's own directory (so the final
``os.replace`` is an atomic rename on one filesystem), fsyncs the file, renames it over the target
and fsyncs the directory. A reader therefore sees the old file or the new one, never a torn one. The file gets
the permissions a plain ``open`` would give it (0666 less the umask: group- and world-readable under the usual
022, private under 077), not the 0600 of the temporary file it was written as.

Loaders turn every failure into a `SafeLoadError` that names the file. `torch_load` always passes
``weights_only=True`` explicitly, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot override, and
refuses to run on torch < 2.6, whose weights-only unpickler had a known bypass (CVE-2025-32434).
torch and safetensors are imported lazily so that this module stays cheap to import.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


class SafeLoadError(RuntimeError):
    """A file could not be loaded safely (missing, truncated, corrupt or holding pickled code)."""


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and new entries in it survive a power loss (no-op on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it, rename it onto ``path``, fsync the dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file for writing that appears at ``path`` atomically when the block exits cleanly."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace, fsync dir)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a ``{name: tensor}`` dict as safetensors (tensors detached, moved to CPU, contiguous)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with _atomic_target(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file onto the CPU; any failure is a `SafeLoadError` naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise SafeLoadError(f"{path}: cannot load safetensors file ({type(e).__name__}: {e})") from e


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` (keep it to tensors and plain containers: `torch_load` loads nothing else)."""
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def unsafe_weights_only_reason() -> str | None:
    """Why this torch's ``weights_only`` unpickler cannot be trusted, or None (torch >= 2.6)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        return f"its weights_only loader can be bypassed on torch {torch.__version__} (CVE-2025-32434)"
    return None


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU; any failure is a `SafeLoadError` naming the file."""
    import torch

    reason = unsafe_weights_only_reason()
    if reason:
        raise SafeLoadError(f"{path}: refusing torch.load: {reason}. Upgrade to torch>=2.6 or use safetensors.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SafeLoadError(f"{path}: cannot load safely with weights_only=True ({type(e).__name__}: {first})") from e
