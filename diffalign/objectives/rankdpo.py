"""RankDPO (Karthik et al., arXiv 2410.18013): listwise Diffusion-DPO with DCG pair weights, offline.

Paper, Algorithm 2 (reconstructed from an OCR of the algorithm box; no official code was found). For a prompt with
K images x^1..x^K, per-image scores s_i and preference probabilities φ_i (higher = better)::

    s_i   = ‖ε^i - ε_θ(x^i_t, t)‖² - ‖ε^i - ε_ref(x^i_t, t)‖²            (e_θ - e_ref, as in Diffusion-DPO)
    G_i   = 2^{φ_i}                                                     (gain)
    D(r)  = log_b(1 + r)                                                (discount; b = 2, the DCG convention)
    Δ_ij  = |G_i - G_j| · |1/D(τ(i)) - 1/D(τ(j))|                        (LambdaRank-style |ΔDCG| of swapping i, j)
    L     = Σ_{i ≻ j} Δ_ij · -log σ( -β (s_i - s_j) )                     (i ≻ j: φ_i > φ_j)

Conventions (reconstructed, so each one is a choice, documented here):

* No ½ in front of β. Our DPO writes z = -β/2·(s_w - s_l); RankDPO writes -β_rank·(s_i - s_j). For K = 2 the loss
  is Δ_12 · DPO loss exactly when β_rank = β_ours / 2 (so β_ours = 5000 corresponds to β_rank = 2500). The paper's
  β was not found.
* The ranks τ that set the discount are an input (1 = best). Algorithm 2 ranks by φ; the Fig. 2 caption ranks by
  the current model's scores (LambdaRank's |ΔNDCG| under the model ranking). The caller decides: pass
  ``rank_positions(phi)`` or ``rank_positions(-scores)`` (a lower s means the policy favours the image more).
* Pairs are oriented by φ (i above j when φ_i > φ_j), whatever the ranks. A tie in φ (φ_i = φ_j) has
  G_i = G_j, so Δ_ij = 0: tied pairs add nothing, in either orientation.
* The log base b only rescales the loss: 1/log_b(1 + r) = ln b / ln(1 + r), so every Δ_ij is multiplied by the
  same ln b / ln 2. It changes the loss scale (like the learning rate; Adam is nearly invariant to it), never the
  relative weights. Exposed because the OCR leaves the base illegible.
* The gain 2^φ (not DCG's 2^φ - 1): the -1 cancels in G_i - G_j.
* Reduction over the K(K-1)/2 pairs of a list: ``"sum"`` (default, Algorithm 2 as read) or ``"mean"`` (the sum
  divided by K(K-1)/2, tied pairs counted with their zero weight: a constant rescaling). Lists are then averaged
  over the batch.

Syn-Pic's φ (Algorithm 1) is the average pairwise win-rate over n reward models, C_i / (n(K-1)); it is data
preparation and not computed here.

Notation (code -> paper): ``scores`` (B, K) = s_i; ``phi`` (B, K) = φ(x^i); ``ranks`` (B, K) = τ(i); ``beta`` =
β_rank; ``log_base`` = b; ``weights`` (B, K, K) = Δ_ij (symmetric, zero on the diagonal).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


class RankDPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of the per-list losses
    list_losses: torch.Tensor  # (B,): Σ (or mean) over the list's pairs
    weights: torch.Tensor  # (B, K, K): Δ_ij


def rank_positions(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..K along the last dim, 1 = largest value; ties keep list order (stable). Long, shape of ``values``.

    Pass φ for Algorithm 2's ranking, or -scores for the model's own ranking (lower s = favoured)."""
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, values.shape[-1] + 1, device=values.device).expand_as(order))
    return ranks


def rankdpo_pair_weights(phi: torch.Tensor, ranks: torch.Tensor, log_base: float = 2.0) -> torch.Tensor:
    """Δ_ij = |2^φ_i - 2^φ_j| · |1/log_b(1+τ(i)) - 1/log_b(1+τ(j))|, shape (B, K, K), symmetric, ≥ 0, zero diagonal.

    Args:
        phi: (B, K) preference probabilities (Syn-Pic: in [0, 1]; higher = better).
        ranks: (B, K) rank positions, 1 = best.
        log_base: b of the discount (DCG convention 2; only rescales Δ, see the module docstring).
    """
    if not log_base > 1:
        raise ValueError(f"log_base must be > 1, got {log_base}")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based positions (1 = best)")
    gain = torch.pow(2.0, phi)
    inv_discount = math.log(log_base) / torch.log1p(ranks.to(phi.dtype))  # 1 / log_b(1 + r)
    return (gain[..., :, None] - gain[..., None, :]).abs() * (inv_discount[..., :, None] - inv_discount[..., None, :]).abs()


def rankdpo_loss(
    scores: torch.Tensor,
    phi: torch.Tensor,
    ranks: torch.Tensor,
    beta: float,
    *,
    log_base: float = 2.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> RankDPOLoss:
    """RankDPO: Σ_{φ_i > φ_j} Δ_ij · -log σ(-β(s_i - s_j)) per list, then the batch mean.

    Args:
        scores: (B, K) s_i = e_θ(x^i) - e_ref(x^i) (per-sample MSE means; shared t, ε per list by default).
        phi: (B, K) preference probabilities, higher = better; orient the pairs.
        ranks: (B, K) positions for the discount, 1 = best (`rank_positions` of φ or of -scores).
        beta: β_rank, with no ½ (β_rank = β_DPO / 2 matches `dpo_loss` at K = 2). Not found in the paper; by that
            correspondence typical 1000-2500 (Diffusion-DPO's 2000-5000).
        log_base: discount base b (default 2).
        reduction: "sum" over the list's pairs (default) or "mean" over its K(K-1)/2 pairs.
    """
    if scores.ndim != 2 or scores.shape[-1] < 2:
        raise ValueError(f"scores must be (B, K) with K >= 2, got {tuple(scores.shape)}")
    if phi.shape != scores.shape or ranks.shape != scores.shape:
        raise ValueError(f"scores, phi and ranks must share a shape, got {tuple(scores.shape)}, {tuple(phi.shape)}, {tuple(ranks.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    phi = phi.to(scores.dtype)
    weights = rankdpo_pair_weights(phi, ranks, log_base)  # (B, K, K)
    above = phi[:, :, None] > phi[:, None, :]  # i ≻ j
    pair = -F.logsigmoid(-beta * (scores[:, :, None] - scores[:, None, :]))  # (B, K, K): -log σ(-β(s_i - s_j))
    list_losses = torch.where(above, weights * pair, torch.zeros_like(pair)).sum(dim=(1, 2))
    if reduction == "mean":
        k = scores.shape[-1]
        list_losses = list_losses / (k * (k - 1) / 2)
    return RankDPOLoss(list_losses.mean(), list_losses, weights)
