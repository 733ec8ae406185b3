"""The data order: an endless stream of per-epoch permutations, cut into global micro-batches.

Global micro-batch j covers stream positions [j·G, (j+1)·G) with G = batch_size × num_processes; process r
takes its contiguous slice of B. Resuming at micro-batch j needs only j, so no loader is fast-forwarded,
and 1 process with batch 2B sees exactly the items that 2 processes with batch B see together.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from diffalign.randomness import epoch_permutation


class GlobalBatchSampler(Sampler[int]):
    def __init__(self, num_items: int, batch_size: int, seed: int, num_processes: int = 1, rank: int = 0, start_micro_batch: int = 0):
        if num_items <= 0:
            raise ValueError("the training set is empty")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.rank = num_processes, rank
        self.start_micro_batch = start_micro_batch
        self._perms: dict[int, torch.Tensor] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch not in self._perms:
            self._perms = {epoch: epoch_permutation(self.num_items, self.seed, epoch)}
        return int(self._perms[epoch][offset])

    def epoch_of(self, micro_batch: int) -> int:
        return (micro_batch * self.batch_size * self.num_processes) // self.num_items

    def __iter__(self) -> Iterator[int]:
        j = self.start_micro_batch
        global_batch = self.batch_size * self.num_processes
        while True:
            start = j * global_batch + self.rank * self.batch_size
            for pos in range(start, start + self.batch_size):
                yield self._at(pos)
            j += 1

    def __len__(self) -> int:  # one epoch's worth for this process; iteration itself is endless
        return self.num_items // self.num_processes
