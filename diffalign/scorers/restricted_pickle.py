"""Reading a pickled whole ``nn.Module`` (such as the official MPS checkpoint) without running its code.

A file written by ``torch.save(module)`` names every class of the module tree as a pickle global, and a
plain ``torch.load`` imports and instantiates them: any global, ``os.system`` included, would run. Here
the file goes through torch's own ``weights_only`` unpickler, which rebuilds only tensors, storages, dtypes
and plain containers and refuses every other global unless it is allowlisted. The allowlist is the
caller's exact list of class names (``module.Qualname``); each name is mapped to a fresh `PickledObject`
subclass carrying that name, an inert record of the constructor arguments and the state the pickle gives
it. No class of the original program is imported or called, so the file needs neither the original code
nor a compatible library version, and anything off the list (``os.system``, ``builtins.eval``, a class
of another project) stops the load before it is called.

`module_state_dict` then walks the records' ``_modules``, ``_parameters`` and ``_buffers`` (skipping
``_non_persistent_buffers_set``) to the flat state dict ``nn.Module.state_dict`` would have given.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable

import torch

from diffalign.io import unsafe_weights_only_reason
from diffalign.scorers.weights import ScorerWeightsError


class PickledObject:
    """An inert stand-in for an allowlisted pickled class: records what the pickle gives, runs nothing.

    ``official_name`` is the ``module.Qualname`` the pickle used. Constructor arguments (a pickle that
    calls the class) are kept in ``_pickle_args``; a dict state becomes attributes, any other state is
    kept in ``_pickle_state``.
    """

    official_name = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_pickle_args"] = (args, kwargs)

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_pickle_state"] = state
        if slots:
            self.__dict__.update(slots)

    def __repr__(self) -> str:
        return f"<pickled {self.official_name}>"


def stand_in(full_name: str) -> type[PickledObject]:
    """A `PickledObject` subclass whose ``__module__``/``__qualname__`` are ``full_name``'s."""
    module, _, qualname = full_name.rpartition(".")
    if not module or not qualname:
        raise ValueError(f"expected 'module.Qualname', got {full_name!r}")
    return type(qualname.rpartition(".")[2], (PickledObject,),
                {"__module__": module, "__qualname__": qualname, "official_name": full_name})


def _refusal(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, in a short sentence."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        name = found.group(1).rstrip(".")
        return f"it names the global {name if '.' in name else 'builtins.' + name}, which is not allowed"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line or "unrecognized" in line or "Can only" in line),
                lines[-1] if lines else type(error).__name__)


def load_restricted(path: str | os.PathLike, allowed_classes: Iterable[str]):
    """The object pickled in a ``torch.save`` file, every allowlisted class replaced by its stand-in.

    Raises `ScorerWeightsError` naming the refused global when the file names anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise ScorerWeightsError(f"{path}: weight file not found")
    reason = unsafe_weights_only_reason()
    if reason:
        raise ScorerWeightsError(f"{path}: refusing to unpickle: {reason}. Upgrade to torch>=2.6.")
    allowed = sorted(set(allowed_classes))
    stand_ins = [(stand_in(name), name) for name in allowed]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ScorerWeightsError(
            f"{path}: refused to unpickle: {_refusal(e)}; only tensors, plain containers and "
            f"{len(allowed)} allowlisted module classes are accepted, and those only as inert records") from e
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file; re-raised with the file name
        raise ScorerWeightsError(f"{path}: cannot read ({type(e).__name__}: {_refusal(e)})") from e


def _entries(record: PickledObject, attribute: str) -> Mapping:
    value = record.__dict__.get(attribute, {})
    if not isinstance(value, Mapping):
        raise ScorerWeightsError(f"{record.official_name}.{attribute} is {type(value).__name__}, not a mapping")
    return value


def module_state_dict(root: PickledObject) -> dict[str, torch.Tensor]:
    """``root.state_dict()`` of the pickled module tree: parameters and persistent buffers, by dotted name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(record, prefix: str) -> None:
        where = prefix.rstrip(".") or "the root"
        if not isinstance(record, PickledObject):
            raise ScorerWeightsError(f"{where}: expected a pickled module, found {type(record).__name__}")
        if id(record) in seen:
            raise ScorerWeightsError(f"{where}: a module that appears twice in the pickled tree")
        seen.add(id(record))
        non_persistent = record.__dict__.get("_non_persistent_buffers_set", set())
        for kind in ("_parameters", "_buffers", "_modules"):
            for name, value in _entries(record, kind).items():
                if not isinstance(name, str):
                    raise ScorerWeightsError(f"{where}.{kind}: a {type(name).__name__} key, not a name")
                if value is None or (kind == "_buffers" and name in non_persistent):
                    continue
                if kind == "_modules":
                    walk(value, f"{prefix}{name}.")
                elif not isinstance(value, torch.Tensor):
                    raise ScorerWeightsError(f"{prefix}{name}: expected a tensor, found {type(value).__name__}")
                else:
                    out[prefix + name] = value.detach()

    walk(root, "")
    return out
