"""GRPO on SD models with pointwise rewards (`grpo`), and the policy-gradient half every GRPO-family method shares.

An online method (`Needs.feed == 'prompts'`): the loop samples rollout rounds (`diffalign.trainers.online`), asks the
method for each image's advantage (`advantages`, over whole groups, wherever their images were sampled), then trains
the round in optimizer steps of `train.batch_size × grad_accum` trajectories per process (`steps_per_round`). Each
trajectory trains `timestep_fraction` of its stochastic steps (the last one left out with `ignore_last`), a
counter-based random subset chosen once per round (`plan`); within a step each micro-batch of trajectories is trained
at each of its chosen steps in turn, one backward per (micro-batch, step), the loss divided by grad_accum × steps per
trajectory (Pref-GRPO's normalisation). `loss` is `diffalign.objectives.grpo`: the clipped ratio, plus the optional
closed-form KL to the reference. `grpo` scores every image with pointwise scorers: per scorer, group-normalised
advantages (std + 1e-8, unbiased, clipped ±5) weighted and summed (Pref-GRPO's reward dispatcher), or the weighted sum
of raw scores normalised once (``combine: sum``, DanceGRPO's single reward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.config.methods import GroupRollouts, GRPOMethod
from diffalign.objectives.grpo import clipped_policy_loss, gaussian_mean_kl
from diffalign.randomness import item_generator
from diffalign.rewards import group_advantages, log_sigmoid_centered, weighted_advantages
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.online import each_trajectory_once
from diffalign.trainers.rollout import Trajectories, transition


@dataclass
class TransitionBatch:
    """The transitions one backward trains: row i is trajectory `rows[i]` of `traj` at its step `steps[i]`."""

    traj: Trajectories
    rows: torch.Tensor  # (B,) long
    steps: torch.Tensor  # (B,) long
    advantages: torch.Tensor  # (B,)

    @property
    def draws_key(self) -> tuple[list[int], list[int]]:
        """(slots, prompt ids) of the rows: what keys a method's draws for them."""
        return self.traj.slots[self.rows].tolist(), self.traj.prompt_ids[self.rows].tolist()

    @property
    def old_log_probs(self) -> torch.Tensor:
        return self.traj.log_probs[self.rows, self.steps]


class GroupPolicyGradient:
    """The clipped-ratio loss on stored transitions, shared by `grpo` and `pref_grpo`; subclasses give `advantages`."""

    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "reward", "clipfrac")

    def __init__(self, cfg: GroupRollouts):
        self.cfg = cfg
        self.needs = Needs(reference=cfg.kl_beta > 0, feed="prompts", rewards=True, preferences=False)

    def scorer_names(self) -> list[str]:
        raise NotImplementedError

    def steps_per_round(self, round_size: int, per_step: int, local: int) -> int:
        """Optimizer steps that train one round: its trajectories once each, `per_step` per step."""
        return each_trajectory_once(round_size, per_step)

    def trainable_steps(self, traj: Trajectories) -> torch.Tensor:
        """The steps a trajectory may train: the stochastic ones, the last left out with `ignore_last`."""
        trainable = traj.grid.stochastic(self.cfg.eta).clone()
        if self.cfg.ignore_last:
            trainable[-1] = False
        steps = torch.nonzero(trainable).flatten()
        if len(steps) == 0:
            raise ValueError("no trainable rollout step: method.sampling_steps must be at least 2 (3 with ignore_last)")
        return steps

    def plan(self, traj: Trajectories, values: torch.Tensor, r: int, seed: int) -> dict[str, torch.Tensor]:
        """Each trajectory's trained steps for round r, (n, J): a counter-based random subset of the trainable steps."""
        steps = self.trainable_steps(traj)
        j = max(1, int(len(steps) * self.cfg.timestep_fraction))
        rows = [steps[torch.randperm(len(steps), generator=item_generator(seed, r, int(slot), int(pid), "trained_steps"))[:j]]
                for slot, pid in zip(traj.slots, traj.prompt_ids)]
        return {"trained": torch.stack(rows)}

    def batches(self, rd, in_round: int, step: int, train) -> list[list[TransitionBatch]]:
        """Per micro-batch of this step's trajectories, one `TransitionBatch` per trained step."""
        b, accum = train.batch_size, train.grad_accum
        start = in_round * b * accum
        trained = rd.plan["trained"]
        out = []
        for a in range(accum):
            rows = torch.arange(start + a * b, start + (a + 1) * b)
            out.append([TransitionBatch(rd.traj, rows, trained[rows, j], rd.values[rows]) for j in range(trained.shape[1])])
        return out

    def advantages(self, scorers: dict, images: torch.Tensor, prompts: list[str], groups: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(advantage per image (N,), metrics) for N images in whole groups; `groups` holds each image's group id."""
        raise NotImplementedError

    def loss(self, models, batch: TransitionBatch, draws):
        cfg = self.cfg
        logp, mean, sigma = transition(models, batch.traj, batch.rows, batch.steps, detach_uncond=cfg.detach_uncond)
        per, metrics = clipped_policy_loss(logp, batch.old_log_probs.to(logp.device), batch.advantages.to(logp.device), cfg.clip_range)
        if cfg.kl_beta > 0:
            _, ref_mean, _ = transition(models, batch.traj, batch.rows, batch.steps, reference=True)
            kl = gaussian_mean_kl(mean, ref_mean, sigma)
            per = per + cfg.kl_beta * kl
            metrics["kl"] = kl.detach().mean()
        loss = per.mean()
        return loss, {"loss": loss.detach(), **{k: v.to(loss.device) for k, v in metrics.items()}}


def pointwise_scores(scorers: dict, names, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each named scorer's overall score of every image, float64 on the CPU."""
    return {name: scorers[name].score(images, prompts)["overall"].detach().double().cpu() for name in names}


class GRPO(GroupPolicyGradient):
    name: ClassVar[str] = "grpo"

    def __init__(self, cfg: GRPOMethod):
        super().__init__(cfg)
        # combine lsc: each prompt's reference reward comes from the base model's samples (LoRA: adapters off)
        self.needs_reference_rewards = cfg.combine == "lsc"
        if self.needs_reference_rewards:
            self.needs = dataclasses.replace(self.needs, reference=True)

    def scorer_names(self) -> list[str]:
        return list(self.cfg.rewards)

    def advantages(self, scorers, images, prompts, groups, reference: dict[str, torch.Tensor] | None = None):
        """Group advantages of the weighted rewards; with ``combine: lsc``, of Σ_s w_s·log σ(r_s − r_ref,s(prompt)), `reference`
        holding each image's r_ref per scorer (`OnlineFeed.reference_rewards`)."""
        cfg = self.cfg
        scores = pointwise_scores(scorers, cfg.rewards, images, prompts)
        if cfg.combine == "lsc":
            if reference is None:
                raise ValueError("method.combine = lsc needs each prompt's reference rewards")
            total = sum(w * log_sigmoid_centered(scores[k], reference[k]) for k, w in cfg.rewards.items())
            adv = group_advantages(total, groups, clip=None, std_normalize=cfg.std_normalize)
        elif cfg.combine == "sum":
            total = sum(w * scores[k] for k, w in cfg.rewards.items())
            adv = group_advantages(total, groups, clip=None, std_normalize=cfg.std_normalize)
        else:
            per_reward = {k: group_advantages(v, groups, clip=None, std_normalize=cfg.std_normalize) for k, v in scores.items()}
            adv = weighted_advantages(per_reward, cfg.rewards)
        if cfg.renormalize:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        metrics = {"reward": sum(w * scores[k] for k, w in cfg.rewards.items()).mean()}
        metrics |= {f"reward/{k}": v.mean() for k, v in scores.items()}
        return adv.clamp(-cfg.adv_clip, cfg.adv_clip), metrics
