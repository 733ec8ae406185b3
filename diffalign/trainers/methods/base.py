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
    """A method that samples from the policy during training (`Needs.feed == 'prompts'`); the rounds are the loop's
    (`diffalign.trainers.online`), the rest is the method's:

    - `scorer_names()`: the scorers the loop loads for it;
    - `steps_per_round(round_size, per_step, local)`: optimizer steps that train one rollout round (ValueError when the
      sizes do not fit, naming the settings);
    - `advantages(scorers, images, prompts, groups)`: a value per image from the rewards of whole groups (every
      process computes it on the gathered round), and the round's metrics;
    - `plan(traj, values, round, seed)`: tensors decided once per round (saved inside a checkpoint with the round);
    - `batches(round, step_in_round, step, train_cfg)`: per micro-batch, the batches `loss` turns into one backward each;
    - optionally `sample(models, feed, round, slots, prompt_ids, prompts, cond, uncond, init, noise)`: rollouts of its
      own instead of `rollout.sample_trajectories` (TailorPO's child pairs), returning latents, log-probs, plan, metrics.
    """

    def scorer_names(self) -> list[str]: ...

    def steps_per_round(self, round_size: int, per_step: int, local: int) -> int: ...

    def advantages(self, scorers: dict, images: torch.Tensor, prompts: list[str], groups: torch.Tensor) -> tuple[torch.Tensor, dict]: ...

    def plan(self, traj, values: torch.Tensor, r: int, seed: int) -> dict[str, torch.Tensor]: ...

    def batches(self, rd, in_round: int, step: int, train) -> list[list[Any]]: ...
