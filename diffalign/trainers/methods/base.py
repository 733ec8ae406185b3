"""What a method is: a declaration of what it needs from the loop (`Needs`) and a loss over a batch.

The loop reads `needs` and builds exactly that (a reference model, an EMA teacher, scorers, cached latent
items or prompts for rollouts); it never names a method. Metrics are whatever the method returns: the loop
averages them over accumulation and processes, logs, plots and shows them in the progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from diffalign.randomness import Draws
from diffalign.trainers.batch import LatentBatch
from diffalign.trainers.models import Models

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Needs:
    """What the loop builds for a method."""

    reference: bool = True  # LoRA: the same UNet with adapters disabled; full fine-tune: a frozen copy
    feed: Literal["latents", "prompts"] = "latents"  # cached latent items, or prompts for rollouts (online methods)
    teacher_decay: float | None = None  # an EMA teacher of the policy with this decay (Self-NPO)
    rewards: bool = False  # scorers through diffalign.rewards (online methods)
    preferences: bool = True  # a preference signal in the data (K >= 2); False: captioned single images will do (Self-NPO)


class Method(Protocol):
    """An offline method: a loss on a batch of cached items."""

    name: ClassVar[str]
    needs: ClassVar[Needs]
    progress_keys: ClassVar[tuple[str, ...]]  # metrics worth a place in the progress bar

    def loss(self, models: Models, batch: LatentBatch, draws: Draws) -> tuple[torch.Tensor, Metrics]: ...

    # Optional: `use_data(dataset)` is called once with the `LatentPairDataset` before training, for statistics over the
    # whole cache (SmPO's score range); a method without it never sees the dataset.


class OnlineMethod(Method, Protocol):
    """A method that samples from the policy during training (`Needs.feed == 'prompts'`)."""

    def collect(self, models: Models, prompts: list[str], draws: Draws) -> list[Any]: ...
