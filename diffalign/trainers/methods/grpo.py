"""GRPO on SD models with pointwise rewards (`grpo`), and the policy-gradient half every GRPO-family method shares.

An online method (`Needs.feed == 'prompts'`): the loop samples rollout rounds (`diffalign.trainers.online`), asks the
method for each image's advantage (`advantages`, over whole groups, wherever their images were sampled), then trains
each trajectory's chosen steps with `loss` (`diffalign.objectives.grpo`: the clipped ratio, plus the optional
closed-form KL to the reference). `grpo` scores every image with pointwise scorers: per scorer, group-normalised
advantages (std + 1e-8, unbiased, clipped ±5) weighted and summed (Pref-GRPO's reward dispatcher), or the weighted sum
of raw scores normalised once (``combine: sum``, DanceGRPO's single reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.config.methods import GroupRollouts, GRPOMethod
from diffalign.objectives.grpo import clipped_policy_loss, gaussian_mean_kl
from diffalign.rewards import group_advantages, weighted_advantages
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.rollout import Trajectories, transition


@dataclass
class TransitionBatch:
    """The transitions one backward trains: row i is trajectory `rows[i]` of `traj` at its step `steps[i]`."""

    traj: Trajectories
    rows: torch.Tensor  # (B,) long
    steps: torch.Tensor  # (B,) long
    advantages: torch.Tensor  # (B,)

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

    def scorer_names(self) -> list[str]:
        return list(self.cfg.rewards)

    def advantages(self, scorers, images, prompts, groups):
        cfg = self.cfg
        scores = pointwise_scores(scorers, cfg.rewards, images, prompts)
        if cfg.combine == "sum":
            total = sum(w * scores[k] for k, w in cfg.rewards.items())
            adv = group_advantages(total, groups, clip=None)
        else:
            adv = weighted_advantages({k: group_advantages(v, groups, clip=None) for k, v in scores.items()}, cfg.rewards)
        if cfg.renormalize:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        metrics = {"reward": sum(w * scores[k] for k, w in cfg.rewards.items()).mean()}
        metrics |= {f"reward/{k}": v.mean() for k, v in scores.items()}
        return adv.clamp(-cfg.adv_clip, cfg.adv_clip), metrics
