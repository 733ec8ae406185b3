"""Diffusion-DPO (Wallace et al., 2023, arXiv:2311.12908), in the official code's convention.

Paper, Eq. 14 (with T·ω(λ_t) folded into β)::

    L(θ) = -E log σ( -β/2 · [ (‖ε_w - ε_θ(x_w,t, t)‖² - ‖ε_w - ε_ref(x_w,t, t)‖²)
                               - (‖ε_l - ε_θ(x_l,t, t)‖² - ‖ε_l - ε_ref(x_l,t, t)‖²) ] )

Official code (SalesforceAIResearch/DiffusionDPO ``train.py``): each error is the per-sample MSE *mean*
over C, H, W; winner and loser share t and ε; ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``;
``loss = -logsigmoid(inside_term).mean()``. β ≈ 2000-5000 in this convention (diffusers' SD1.5 script
drops the ½, so its β = 2500 equals 5000 here).

Notation (code -> paper): ``model_err_w`` = ‖ε_w - ε_θ(x_w,t)‖² / (C·H·W), ``ref_err_w`` the same for
ε_ref, ``logits`` = the argument of σ (> 0 when the model prefers the winner more than the reference does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch
    logits: torch.Tensor  # (B,): -β/2 · Δ, the implicit reward margin; > 0 means "winner preferred"


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    label: torch.Tensor | None = None,
) -> DPOLoss:
    """Diffusion-DPO loss from per-sample errors, each of shape (B,).

    Args:
        model_err_w, model_err_l: policy errors on winner / loser (per-sample MSE mean over C,H,W).
        ref_err_w, ref_err_l: reference errors on the same x_t, t and ε (no gradient needed).
        beta: β of the -β/2 convention (official 5000; typical 2000-5000).
        label: optional (B,) probability that "w" is really preferred. 1 (default) is the paper's hard
            pair. 0.5 marks a tie: the loss becomes ½[-log σ(z) - log σ(-z)], minimised at z = 0, i.e.
            "neither image should gain on the other". In general -[p·log σ(z) + (1-p)·log σ(-z)].

    Returns:
        `DPOLoss(loss, logits)` with z = logits = -β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))].
    """
    model_diff = model_err_w - model_err_l  # (B,)
    ref_diff = ref_err_w - ref_err_l  # (B,)
    logits = -0.5 * beta * (model_diff - ref_diff)
    if label is None:
        losses = -F.logsigmoid(logits)
    else:
        label = label.to(logits.dtype)
        losses = -(label * F.logsigmoid(logits) + (1 - label) * F.logsigmoid(-logits))
    return DPOLoss(losses.mean(), logits)
