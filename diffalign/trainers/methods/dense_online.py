"""Dense-reward temporal discounting, official online form (`dense_online`; Yang, Chen, Zhou, ICML 2024,
arXiv:2402.08265; yinan-yang/Dense-Reward-T2I `preference_based_policy_learner.py`, research/step_methods.md §4).

Per rollout round (the official replay buffer, refreshed whole at each collection): G rollouts per prompt, scored by
the weighted rewards; `keep` of them kept, evenly spaced in reward rank (`np.linspace` over the sorted indices). Each
optimizer step then trains `train.batch_size × grad_accum` tuples per process; a tuple is M kept trajectories of one
prompt, ordered by reward, with K steps drawn ∝ γ^k (with replacement, k = 0 the noisiest, shared by the tuple):

    ℓ(traj) = τ · (1/K) Σ_i clamp(log π_θ(x_{k_i+1} | x_{k_i}) − log π_I(x_{k_i+1} | x_{k_i}), −c, c)
    L = ListMLE(ℓ(traj_1), …, ℓ(traj_M))        (M = 2: −log σ(ℓ_w − ℓ_l))

with π_I the initial model (LoRA: adapters off) and the log-probs those of the CFG-combined DDIM step. Each process
holds whole groups (its share of a round is a multiple of G): tuples are drawn from its own groups.
Where we differ: steps are drawn among the stochastic steps only (with diffusers' set_alpha_to_one the last step is
deterministic and has no log-prob; the official draws it with weight γ^49 ≈ 0.006).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.config.methods import DenseOnlineMethod
from diffalign.objectives.dense import dense_online_logits, listmle_loss
from diffalign.randomness import item_generator
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.grpo import pointwise_scores
from diffalign.trainers.rollout import Trajectories, transition


@dataclass
class TupleBatch:
    """B tuples of M trajectories (best first), each with its K drawn steps."""

    traj: Trajectories
    rows: torch.Tensor  # (B, M) long, ordered by reward, best first
    steps: torch.Tensor  # (B, K) long

    @property
    def draws_key(self) -> tuple[list[int], list[int]]:
        return self.traj.slots[self.rows[:, 0]].tolist(), self.traj.prompt_ids[self.rows[:, 0]].tolist()


class DenseOnline:
    name: ClassVar[str] = "dense_online"
    needs: ClassVar[Needs] = Needs(reference=True, feed="prompts", rewards=True, preferences=False)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "reward", "logit_gap")

    def __init__(self, cfg: DenseOnlineMethod):
        self.cfg = cfg

    def scorer_names(self) -> list[str]:
        return list(self.cfg.rewards)

    def steps_per_round(self, round_size: int, per_step: int, local: int) -> int:
        if local % self.cfg.group_size:
            raise ValueError(f"dense_online draws tuples from each process's own groups: its share of a round ({local} trajectories) "
                             f"must be whole groups of method.group_size = {self.cfg.group_size}")
        return self.cfg.updates_per_round

    def advantages(self, scorers, images, prompts, groups):
        """The weighted reward of every image (ranks trajectories; not normalised)."""
        scores = pointwise_scores(scorers, self.cfg.rewards, images, prompts)
        total = sum(w * scores[k] for k, w in self.cfg.rewards.items())
        return total, {"reward": total.mean(), **{f"reward/{k}": v.mean() for k, v in scores.items()}}

    def plan(self, traj: Trajectories, values: torch.Tensor, r: int, seed: int) -> dict[str, torch.Tensor]:
        """Per local group, the rows of its kept trajectories, best first: `keep` evenly spaced in reward rank."""
        g, keep = self.cfg.group_size, self.cfg.keep
        picks = torch.linspace(0, g - 1, keep).round().long()
        kept = []
        for start in range(0, len(traj), g):
            order = torch.argsort(values[start : start + g], descending=True, stable=True)
            kept.append(start + order[picks])
        return {"kept": torch.stack(kept)}

    def step_weights(self, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, probabilities ∝ γ^k) over the stochastic steps."""
        steps = torch.nonzero(traj.grid.stochastic(self.cfg.eta)).flatten()
        w = self.cfg.gamma ** steps.double()
        return steps, w / w.sum()

    def batches(self, rd, in_round: int, step: int, train) -> list[list[TupleBatch]]:
        """One batch of `train.batch_size` tuples per micro-batch, drawn counter-based per (step, tuple slot)."""
        cfg, kept = self.cfg, rd.plan["kept"]
        steps, probs = self.step_weights(rd.traj)
        out = []
        for a in range(train.grad_accum):
            rows, drawn = [], []
            for i in range(train.batch_size):
                gen = item_generator(train.seed, step, a * train.batch_size + i, rd.index, "dense_tuples")
                group = int(torch.randint(len(kept), (1,), generator=gen))
                members = torch.randperm(cfg.keep, generator=gen)[: cfg.tuple_size].sort().values  # kept is best first
                rows.append(kept[group, members])
                drawn.append(steps[torch.multinomial(probs, cfg.steps_per_tuple, replacement=True, generator=gen)])
            out.append([TupleBatch(rd.traj, torch.stack(rows), torch.stack(drawn))])
        return out

    def loss(self, models, batch: TupleBatch, draws):
        cfg = self.cfg
        b, m = batch.rows.shape
        k = batch.steps.shape[1]
        rows = batch.rows[:, :, None].expand(b, m, k).reshape(-1)
        steps = batch.steps[:, None, :].expand(b, m, k).reshape(-1)
        logp = transition(models, batch.traj, rows, steps)[0]
        ref = transition(models, batch.traj, rows, steps, reference=True)[0]
        logits = dense_online_logits((logp - ref.to(logp)).view(b, m, k), cfg.log_ratio_clip, cfg.temperature)
        loss = listmle_loss(logits).mean()
        gap = (logits[:, 0] - logits[:, -1]).detach().mean()
        return loss, {"loss": loss.detach(), "logit_gap": gap,
                      "clipped": ((logp - ref.to(logp)).abs() >= cfg.log_ratio_clip).float().mean().detach()}
