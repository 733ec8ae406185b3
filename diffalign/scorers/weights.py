"""Reading scorer weights safely and checking them strictly.

Files load through safetensors or ``torch.load(weights_only=True)`` (`diffalign.io`), never a bare pickle.
`load_exact` compares a state dict with a module's own keys and shapes before loading, and fails with the
file, the missing and unexpected keys and the shape mismatches: the official loaders' ``strict=False``
(ImageReward) would silently leave random weights in place.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from diffalign.io import load_safetensors, torch_load


class ScorerWeightsError(RuntimeError):
    """A scorer's weight file is missing, unreadable or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file: its shape from the header, its data read by `load` (`load_exact`
    copies a lazy state dict into the model one tensor at a time, so a 7B model is not held twice)."""

    file: Any  # the safe_open handle
    key: str
    shape: torch.Size

    def load(self) -> torch.Tensor:
        return self.file.get_tensor(self.key)


def _lazy_safetensors(path: Path) -> dict[str, LazyTensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        return {k: LazyTensor(handle, k, torch.Size(handle.get_slice(k).get_shape())) for k in handle.keys()}
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ScorerWeightsError(f"{path}: cannot read safetensors header ({type(e).__name__}: {e})") from e


def read_state_dict(path: str | os.PathLike, unwrap: Iterable[str] = ("state_dict",), lazy: bool = False) -> dict:
    """A flat {name: tensor} from a .safetensors file or a weights-only torch file; a dict holding the
    weights under one of ``unwrap``'s keys (``{'state_dict': ...}`` as HPSv2 saves) is unwrapped. With
    ``lazy``, a safetensors file gives `LazyTensor` values (nothing read yet)."""
    path = Path(path)
    if not path.is_file():
        raise ScorerWeightsError(f"{path}: weight file not found")
    if lazy and path.suffix == ".safetensors":
        return _lazy_safetensors(path)
    sd = load_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    for key in unwrap:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ScorerWeightsError(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
    return dict(sd)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with it removed (e.g. ``module.`` from DDP-saved files)."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_exact(module: torch.nn.Module, sd: Mapping, where: str, ignore: Iterable[str] = ()) -> None:
    """Load ``sd`` into ``module`` after checking every key and shape; keys named in ``ignore`` (buffers
    older files carry, such as ``position_ids``) may be present or absent. Values are cast to the module's
    dtypes; `LazyTensor` values are read and copied one at a time."""
    ignore = set(ignore)
    own = module.state_dict()
    given = {k: v for k, v in sd.items() if k not in ignore or k in own}
    missing = sorted(set(own) - set(given) - ignore)
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(f"{k}: file {tuple(given[k].shape)}, model {tuple(own[k].shape)}"
                   for k in set(own) & set(given) if given[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise ScorerWeightsError(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    if any(isinstance(v, LazyTensor) for v in given.values()):
        with torch.no_grad():  # state_dict() tensors share the parameters' storage: copy_ writes the model
            for k, v in given.items():
                if k in own:
                    own[k].copy_(v.load() if isinstance(v, LazyTensor) else v)
        return
    module.load_state_dict({k: v for k, v in given.items() if k in own}, strict=False)


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a weight file or folder (sizes and the first and last MiB of each file), recorded
    with scored data so a changed weight file invalidates it."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]
