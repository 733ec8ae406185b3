"""Counter-based randomness: every draw is a function of (seed, step, slot, item id, stream).

`slot` is the item's position inside its optimizer step's global batch (0 .. batch × accum × processes - 1).
A resumed run, a re-sharded run (1 process × batch 2B, 2 processes × batch B, or batch B × 2 accumulation
steps) and an uninterrupted run therefore draw the same noise, timesteps, caption dropout and posterior
samples for the same item at the same step, without saving generator states.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("timestep", "noise", "latent", "caption_dropout")


def _seed_from(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def item_seed(seed: int, step: int, slot: int, item_id: int, stream: str) -> int:
    return _seed_from(f"{seed}/{step}/{slot}/{item_id}/{stream}")


def item_generator(seed: int, step: int, slot: int, item_id: int, stream: str) -> torch.Generator:
    """A CPU generator for one item (at one slot of one step) and one purpose."""
    if stream not in STREAMS:
        raise ValueError(f"unknown randomness stream {stream!r}; expected one of {STREAMS}")
    return torch.Generator().manual_seed(item_seed(seed, step, slot, item_id, stream))


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch` (the same in every process and on every resume)."""
    g = torch.Generator().manual_seed(_seed_from(f"{seed}/epoch/{epoch}"))
    return torch.randperm(num_items, generator=g)
