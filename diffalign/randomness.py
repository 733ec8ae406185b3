"""Counter-based randomness: every random number diffalign draws is a function of a key, never of a hidden state.

One hash (`hash_int`: the first bytes of blake2b of the key, little-endian) serves every keyed draw in the
package: the toy world's split and scenes, the cache-time crop and flip, the demo pairs, the synthetic
images' seeds, and the trainers' per-item draws below. Each caller builds its own key string, so changing
one never moves another's numbers.

Trainers key a draw by (seed, step, slot, item id, stream); `slot` is the item's position inside its optimizer
step's global batch (0 .. batch × accum × processes - 1). A resumed run, a re-sharded run (1 process × batch 2B,
2 processes × batch B, or batch B × 2 accumulation steps) and an uninterrupted run therefore draw the same
noise, timesteps, caption dropout and posterior samples for the same item at the same step, without saving
generator states. Methods draw more through `Draws` with a stream name of their own (add it to `STREAMS`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

STREAMS = ("timestep", "noise", "latent", "caption_dropout", "flip", "inversion", "image_noise", "discounted_timestep", "self_npo",
           "rollout_init", "rollout_noise", "trained_steps", "dense_tuples", "tailorpo_children", "tailorpo_continuation")
_MASK63 = (1 << 63) - 1


def hash_int(key: str | bytes, bits: int = 64) -> int:
    """The first `bits` / 8 bytes of blake2b(key) as an unsigned little-endian integer."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=bits // 8).digest(), "little")


def seed63(key: str | bytes) -> int:
    """A 63-bit seed from a key (what `torch.Generator.manual_seed` accepts)."""
    return hash_int(key) & _MASK63


def item_seed(seed: int, step: int, slot: int, item_id: int, stream: str) -> int:
    return seed63(f"{seed}/{step}/{slot}/{item_id}/{stream}")


def item_generator(seed: int, step: int, slot: int, item_id: int, stream: str) -> torch.Generator:
    """A CPU generator for one item (at one slot of one step) and one purpose."""
    if stream not in STREAMS:
        raise ValueError(f"unknown randomness stream {stream!r}; expected one of {STREAMS}")
    return torch.Generator().manual_seed(item_seed(seed, step, slot, item_id, stream))


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch` (the same in every process and on every resume)."""
    g = torch.Generator().manual_seed(seed63(f"{seed}/epoch/{epoch}"))
    return torch.randperm(num_items, generator=g)


@dataclass(frozen=True)
class Draws:
    """The keyed draws of one micro-batch: item `item_ids[i]` sits at `slots[i]` of optimizer step `step`."""

    seed: int
    step: int
    slots: Sequence[int]
    item_ids: Sequence[int]

    def per_item(self, stream: str, draw: Callable[[torch.Generator], torch.Tensor]) -> list[torch.Tensor]:
        """`draw(generator)` once per item, each with the item's own generator for `stream`."""
        return [draw(item_generator(self.seed, self.step, slot, i, stream)) for slot, i in zip(self.slots, self.item_ids)]
