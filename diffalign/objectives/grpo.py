"""The GRPO family's policy loss on DDIM-with-log-prob steps (DDPO, DanceGRPO, Pref-GRPO; research/npo_grpo.md §3-4).

For one stored transition x_k -> x_{k+1} of a trajectory with advantage A, sampled under π_old:

    r = exp(log π_θ(x_{k+1}|x_k) − log π_old(x_{k+1}|x_k))                        (log-probs: means over dims)
    L = max(−A·r, −A·clip(r, 1 − ε, 1 + ε))                                        (Pref-GRPO L687-727, DDPO)
      + β_KL · ‖μ_θ − μ_ref‖² / (2σ_k²)   (mean over dims; the closed-form KL of two Gaussians of equal σ_k)

averaged over the trained transitions. ε is 1e-4 in all three codes, so after the first update of a rollout round
the clip decides most terms: the effective step is governed by ε, not by the learning rate alone.
"""

from __future__ import annotations

import torch


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition PPO-clip loss max(−A·r, −A·clip(r, 1−ε, 1+ε)), shape (B,), and diagnostics: the mean ratio,
    the share of clipped terms and the approximate KL ½·mean((log π_θ − log π_old)²) (DDPO's logging)."""
    diff = log_prob - old_log_prob.to(log_prob)
    ratio = torch.exp(diff)
    a = advantages.to(log_prob)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    metrics = {"ratio": ratio.detach().mean(), "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
               "approx_kl": 0.5 * (diff.detach() ** 2).mean()}
    return loss, metrics


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) per dimension, averaged over the non-batch dims: mean((μ_θ − μ_ref)²) / (2σ²), (B,)."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean.to(mean)) ** 2).mean(dim=dims) / (2 * std.reshape(-1).to(mean) ** 2)
