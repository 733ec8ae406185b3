"""SmPO-Diffusion (Lu et al., ICML 2025, arXiv 2506.02698): DPO with a smoothed, reward-derived preference.

Paper (via the official code's algebra; the method section could not be read): the binary preference is
replaced by a smoothed one, p = α/γ = e^{r'(x_w)} / (e^{r'(x_w)} + e^{r'(x_l)}), and substituting the smoothed
densities into DPO multiplies the logit by (2α - γ) = γ(2p - 1)::

    L(θ) = -E log σ( γ(2p - 1) · -β/2 · [ (e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l)) ] )

so equal rewards give p = ½, a zero logit, the constant loss log 2 and no gradient ("the loss approaches zero
[gradient] when preferences are similar"), and γ(2p - 1) = 1 is plain Diffusion-DPO.

Official code (``JaydenLyh/SmPO`` ``train.py`` L739-747, L1061-1064)::

    probs = exp(norm_score_0) / (exp(norm_score_0) + exp(norm_score_1))     # norm = (s - min_val)/(max_val - min_val)
    scale_term = -0.5 * args.beta_dpo * (2*batch['probs'][0] - 1) * 10      # gamma = 10, hard-coded
    inside_term = scale_term * (model_diff - ref_diff); loss = -F.logsigmoid(inside_term).mean()

with ``min_val = 0.11543526500463486``, ``max_val = 0.28201571106910706``: the global min / max of the *raw*
PickScore cosine (no ×logit_scale) over Pick-a-Pic v2. Two departures, both deliberate:

* The official code uses ``probs[0]``, the first pair's p, for the whole micro-batch (right only at its
  ``train_batch_size=1``); here p is per pair, (B,).
* diffalign's PickScore returns the cosine ×100, so the same bounds are `PICKSCORE_LOW` / `PICKSCORE_HIGH`
  (×100); the raw-cosine ones are `PICKSCORE_RAW_LOW` / `PICKSCORE_RAW_HIGH`. Use the bounds of whatever scale
  (and reward model) the scores come from; with another reward, recompute the dataset min / max.

Pair orientation. The official preprocessing orders every pair by PickScore (w = higher score, so p ≥ ½; the human
label only drops ties) and this function expects the same: pass pairs with ``score_w >= score_l``. The loss itself
is invariant under swapping (w, l) together with (s_w, s_l) (p -> 1-p flips the multiplier's sign, and
-log σ(-m·z) with z -> -z is the same number), so a pair stored the other way round is still trained towards the
higher-reward image: the reward, not the slot, decides the direction. Since r' ∈ [0, 1] on the dataset,
p ≤ e/(1+e) ≈ 0.731 and the multiplier γ(2p - 1) ≤ ≈ 4.62 (γ = 10).

Note p = σ(r'_w - r'_l) = σ((s_w - s_l) / (high - low)): only the range high - low matters, not low itself.

Notation (code -> paper): ``score_w/score_l`` = reward r(x_w), r(x_l); ``low/high`` = the min / max used for r';
``p`` = α/γ; ``gamma`` = γ (the sensitivity); ``beta`` = β (-β/2 convention, as `dpo_loss`); logits = γ(2p-1)·z.
The inversion that produces the errors (ReNoise, τ back-solved) lives with the method, not here.
"""

from __future__ import annotations

import torch

from diffalign.objectives.dpo import DPOLoss, dpo_logits, pairwise_loss

PICKSCORE_RAW_LOW = 0.11543526500463486  # official min_val (raw PickScore cosine, Pick-a-Pic v2)
PICKSCORE_RAW_HIGH = 0.28201571106910706  # official max_val
PICKSCORE_LOW = 100 * PICKSCORE_RAW_LOW  # the same bounds on diffalign's PickScore scale (cosine ×100)
PICKSCORE_HIGH = 100 * PICKSCORE_RAW_HIGH


def smpo_probability(score_w: torch.Tensor, score_l: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Smoothed P(w ≻ l) = e^{r'_w} / (e^{r'_w} + e^{r'_l}), r' = (s - low) / (high - low); shape of the scores.

    Args:
        score_w, score_l: reward of each image, winner = higher score (see the module docstring).
        low, high: min-max normalisation bounds, on the scores' scale (official 0.11543526500463486 /
            0.28201571106910706 on raw PickScore cosines = `PICKSCORE_RAW_LOW/HIGH`; ×100 for diffalign's
            PickScore = `PICKSCORE_LOW/HIGH`). Needs high > low.
    """
    if not high > low:
        raise ValueError(f"smpo_probability needs high > low, got low={low}, high={high}")
    r_w = (score_w - low) / (high - low)
    r_l = (score_l - low) / (high - low)
    return torch.sigmoid(r_w - r_l)  # = e^{r_w} / (e^{r_w} + e^{r_l}), without overflow


def smpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    p: torch.Tensor | float,
    gamma: float = 10.0,
) -> DPOLoss:
    """SmPO loss -log σ(γ(2p-1)·z), batch mean, z = `dpo_logits` (errors (B,), as `dpo_loss`).

    Args:
        beta: β, -β/2 convention (official 2000 SD1.5 / 5000 SDXL; typical 2000-5000).
        p: (B,) or scalar smoothed preference from `smpo_probability`, per pair (official: first pair's p).
        gamma: γ, the sensitivity (official 10, hard-coded; secondary notes report 10 best in ablation; typical 1-20).

    Returns:
        `DPOLoss(loss, logits)` with logits = γ(2p - 1)·z, the argument of σ.
    """
    z = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    p = torch.as_tensor(p, dtype=z.dtype, device=z.device)
    logits = gamma * (2 * p - 1) * z
    return DPOLoss(pairwise_loss(logits).mean(), logits)
