"""Lend modules to a device for a while, then put each back where it was.

Frozen parts (the VAE, the text encoders, a sampling UNet) wait on the host and work on the accelerator: the
cache builder encodes with them, validation samples with them, the synthetic source generates with them. Each
of those places moves them there and back; `on_device` is that move as one ``with`` block. Only modules not
already on the target move, and each goes back to the device it came from (not to a fixed "cpu"), so nested
or repeated lending leaves every module where its owner put it.

`Moves` is the same thing for a loan that outlives one block (the synthetic source moves the model it was
lent in its first `generate` and gives it back in `close`): `move` records, `undo` puts back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch


def device_of(module: torch.nn.Module) -> torch.device | None:
    """The device of the module's first parameter (or buffer); None for a module without tensors."""
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


def _resolve(device: torch.device | str) -> torch.device:
    """`device` with an index where it names the current CUDA device implicitly ("cuda" -> "cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Moves:
    """Modules moved to a device, each with the device it came from, so that `undo` puts it back."""

    def __init__(self) -> None:
        self._moved: list[tuple[torch.nn.Module, torch.device]] = []

    def move(self, modules: Iterable[torch.nn.Module], device: torch.device | str) -> Moves:
        """Move each module not already on `device` there, remembering where it was; returns self."""
        target = None
        for module in modules:
            target = target or _resolve(device)  # resolved only when there is something to move
            was = device_of(module)
            if was is not None and was != target:
                module.to(target)
                self._moved.append((module, was))
        return self

    def undo(self) -> None:
        """Put every moved module back on the device it came from (last moved first); nothing is left to undo."""
        while self._moved:
            module, was = self._moved.pop()
            module.to(was)


@contextmanager
def on_device(modules: Iterable[torch.nn.Module], device: torch.device | str) -> Iterator[None]:
    """Inside the block each module is on `device`; afterwards (also after an error) each moved one is back."""
    moves = Moves().move(modules, device)
    try:
        yield
    finally:
        moves.undo()
