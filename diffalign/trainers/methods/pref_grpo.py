"""Pref-GRPO (Wang et al., arXiv:2508.20751): GRPO whose reward is each image's win-rate over its group.

Per group of G images of one prompt, a pairwise judge compares all C(G, 2) pairs (`diffalign.rewards.
preference_matrix`; a judge that is not order-symmetric is asked in both orders, where the official code asks once,
lower index first); a probability becomes a win by `win_rule` (the official verdicts: threshold, ties ½), and

    WR_i = (wins_i + ½·ties_i) / (G − 1),     A_i = clip((WR_i − mean_G) / (std_G + 1e-8), ±5)

(`fastvideo/train_flux_pref_grpo.py` @6c87cfe: `cal_win_rate`, L632-654). Win-rates spread over [0, 1] whatever
the judge's score scale, where a pointwise reward's near-equal scores divided by a tiny group std amplify trivial
differences (the "illusory advantage" of `grpo`). Optional pointwise rewards mix in as weighted group advantages
(the paper-era script: 0.7·A_WR + 1.4·A_CLIP), optionally renormalised over the batch (--apply_gdpo). The judge is
any scorer's `prefer`, or a checklist scorer's question vote (`judge_mode: votes`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffalign.config.methods import PrefGRPOMethod
from diffalign.rewards import group_advantages, preference_matrix, weighted_advantages, win_outcomes, win_rate
from diffalign.trainers.methods.grpo import GroupPolicyGradient, pointwise_scores


class PrefGRPO(GroupPolicyGradient):
    name: ClassVar[str] = "pref_grpo"

    def __init__(self, cfg: PrefGRPOMethod):
        super().__init__(cfg)

    def scorer_names(self) -> list[str]:
        return [self.cfg.judge, *(k for k in self.cfg.extra_rewards if k != self.cfg.judge)]

    def judge(self, scorers: dict):
        """The pairwise judge: the scorer itself, or its question vote."""
        scorer = scorers[self.cfg.judge]
        if self.cfg.judge_mode in ("votes", "graded_votes"):
            from diffalign.scorers.checklist import ChecklistScorer, QuestionVoteJudge

            if not isinstance(scorer, ChecklistScorer):
                raise ValueError(f"method.judge_mode: {self.cfg.judge_mode} needs a checklist scorer; {self.cfg.judge!r} is not one")
            return QuestionVoteJudge(scorer, hard=self.cfg.judge_mode == "votes", margin=self.cfg.vote_margin)
        return scorer

    def advantages(self, scorers, images, prompts, groups):
        cfg = self.cfg
        judge = self.judge(scorers)
        symmetric = {"auto": judge.order_symmetric, "always": False, "never": True}[cfg.both_orders]
        wr = torch.empty(len(prompts), dtype=torch.float64)
        for gid in torch.unique(groups):
            rows = torch.nonzero(groups == gid).flatten()
            p = preference_matrix(lambda a, b, pr: judge.prefer(a, b, pr).prob, images[rows], prompts[int(rows[0])],
                                  order_symmetric=symmetric)
            wr[rows] = win_rate(win_outcomes(p, cfg.win_rule, cfg.tie_band))
        parts, weights = {"win_rate": group_advantages(wr, groups, clip=None, std_normalize=cfg.std_normalize)}, {"win_rate": cfg.win_rate_weight}
        extra = pointwise_scores(scorers, cfg.extra_rewards, images, prompts) if cfg.extra_rewards else {}
        for name, score in extra.items():
            parts[name], weights[name] = group_advantages(score, groups, clip=None, std_normalize=cfg.std_normalize), cfg.extra_rewards[name]
        adv = weighted_advantages(parts, weights, renormalize=cfg.renormalize)
        # the win-rate's mean is ½ by construction: the judge's own score says whether the images improve
        judged = extra[cfg.judge] if cfg.judge in extra else pointwise_scores(scorers, [cfg.judge], images, prompts)[cfg.judge]
        metrics = {"reward": judged.mean(), "win_rate_std": _group_std(wr, groups)}
        metrics |= {f"reward/{k}": v.mean() for k, v in extra.items()}
        return adv.clamp(-cfg.adv_clip, cfg.adv_clip), metrics


def _group_std(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The mean within-group standard deviation (how much the reward separates a group's images)."""
    return torch.stack([values[groups == g].std() for g in torch.unique(groups)]).mean()
