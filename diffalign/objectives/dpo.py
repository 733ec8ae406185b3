"""Diffusion-DPO (Wallace et al., 2023, arXiv:2311.12908), in the official code's convention.

Paper, Eq. 14 (with T·ω(λ_t) folded into β)::

    L(θ) = -E log σ( -β/2 · [ (‖ε_w - ε_θ(x_w,t, t)‖² - ‖ε_w - ε_ref(x_w,t, t)‖²)
                               - (‖ε_l - ε_θ(x_l,t, t)‖² - ‖ε_l - ε_ref(x_l,t, t)‖²) ] )

Official code (SalesforceAIResearch/DiffusionDPO ``train.py``): each error is the per-sample MSE *mean*
over C, H, W; winner and loser share t and ε; ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``;
``loss = -logsigmoid(inside_term).mean()``. β ≈ 2000-5000 in this convention (diffusers' SD1.5 script
drops the ½, so its β = 2500 equals 5000 here).

Notation (code -> paper): ``model_err_w`` = ‖ε_w - ε_θ(x_w,t)‖² / (C·H·W), ``ref_err_w`` the same for
ε_ref, ``logits`` = z = the argument of σ (> 0 when the model prefers the winner more than the reference does),
``label`` = p = P(w ≻ l), ``noise_rate`` = ε (the probability that a stored label is flipped),
ℓ(w,l) = -log σ(z) (the loss when w is preferred), ℓ(l,w) = -log σ(-z) (the loss when l is preferred).

The shared pairwise objective (DPO, InPO, NPO, step DPO) is split in two:

* `dpo_logits` -> z = -β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))];
* `pairwise_loss(z, p)` -> the per-pair loss. Every variant below is the cross-entropy of σ(z) against an
  *effective* label p̃, ``-[p̃·log σ(z) + (1-p̃)·log σ(-z)] = p̃·ℓ(w,l) + (1-p̃)·ℓ(l,w)``:

  - plain (``label_noise="none"``): p̃ = p (1 when no label is given: the paper's hard pair; ½ is a tie).
  - ``flip=True``: p -> 1 - p, i.e. the winner / loser slots are read the other way round (Diffusion-NPO stores
    the dispreferred image in the winner slot). Equal to passing label 1 - p, and to swapping the two images.
  - ``label_noise="conservative"`` (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"): for a hard
    label, (1-ε)·ℓ(w,l) + ε·ℓ(l,w), i.e. the expected loss when the observed label is wrong with probability ε.
  - ``label_noise="unbiased"`` (rDPO; Chowdhury et al. 2024, "Provably Robust DPO", ICML): for a hard label,
    [(1-ε)·ℓ(w,l) - ε·ℓ(l,w)] / (1-2ε), whose expectation over labels flipped with probability ε is the loss on
    the clean label. Needs ε < ½ (at ½ the labels carry no information and the estimator divides by 0).

Soft labels under a noise model. Every loss here is linear in the label: writing a soft label p as the mixture
"hard w≻l with weight p, hard l≻w with weight 1-p" and applying the hard-label formulas to each part gives

  cDPO: p·[(1-ε)ℓ(w,l) + εℓ(l,w)] + (1-p)·[(1-ε)ℓ(l,w) + εℓ(w,l)] = p'·ℓ(w,l) + (1-p')·ℓ(l,w),
        p'  = (1-ε)·p + ε·(1-p)            (the label pushed *through* the symmetric flip channel),
  rDPO: p·[(1-ε)ℓ(w,l) - εℓ(l,w)] + (1-p)·[(1-ε)ℓ(l,w) - εℓ(w,l)] all over (1-2ε) = p''·ℓ(w,l) + (1-p'')·ℓ(l,w),
        p'' = (p - ε) / (1 - 2ε)           (the *inverse* of that channel: the clean label whose noisy version is p).

So cDPO shrinks labels towards ½ and rDPO stretches them away from ½; p'' leaves [0, 1] whenever p > 1-ε or
p < ε (in particular for every hard label), which is what makes rDPO unbounded below (see `pairwise_loss`).
A tie (p = ½) is a fixed point of both maps: p' = p'' = ½, so a tie's loss is the same under all three models.
The flip and the noise maps commute (both channels are symmetric under p -> 1-p), so their order is immaterial.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch
    logits: torch.Tensor  # (B,): -β/2 · Δ, the implicit reward margin; > 0 means "winner preferred"


LabelNoise = Literal["none", "conservative", "unbiased"]

LOGIT_LIMIT = 10.0
"""Default clamp on z for the unbiased (rDPO) loss; see `pairwise_loss`."""


def dpo_logits(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """z = -β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))], shape (B,); > 0 when the policy prefers w more than
    the reference does. ``beta`` is β of the -β/2 convention (official 5000 SDXL / 2000 SD1.5; typical 2000-5000)."""
    model_diff = model_err_w - model_err_l  # (B,)
    ref_diff = ref_err_w - ref_err_l  # (B,)
    return -0.5 * beta * (model_diff - ref_diff)


def _check_noise(label_noise: str, noise_rate: float) -> float:
    eps = float(noise_rate)
    if label_noise == "none":
        if eps != 0.0:
            raise ValueError(f"noise_rate={eps} needs label_noise='conservative' or 'unbiased' (got 'none')")
    elif label_noise == "conservative":
        if not 0.0 <= eps <= 0.5:
            raise ValueError(f"conservative label noise needs 0 <= noise_rate <= 0.5, got {eps} (above ½: flip the labels instead)")
    elif label_noise == "unbiased":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"unbiased label noise needs 0 <= noise_rate < 0.5 (it divides by 1 - 2ε), got {eps}")
    else:
        raise ValueError(f"label_noise must be 'none', 'conservative' or 'unbiased', got {label_noise!r}")
    return eps


def effective_label(
    label: torch.Tensor | float,
    *,
    flip: bool = False,
    label_noise: LabelNoise = "none",
    noise_rate: float = 0.0,
) -> torch.Tensor:
    """The label p̃ that `pairwise_loss` puts against σ(z): p -> 1-p if ``flip``, then p' = (1-ε)p + ε(1-p)
    (conservative) or p'' = (p-ε)/(1-2ε) (unbiased; may leave [0, 1]). Derivation in the module docstring."""
    eps = _check_noise(label_noise, noise_rate)
    p = torch.as_tensor(label)
    if flip:
        p = 1 - p
    if label_noise == "conservative":
        p = (1 - eps) * p + eps * (1 - p)
    elif label_noise == "unbiased":
        p = (p - eps) / (1 - 2 * eps)
    return p


def pairwise_loss(
    z: torch.Tensor,
    label: torch.Tensor | float | None = None,
    *,
    flip: bool = False,
    label_noise: LabelNoise = "none",
    noise_rate: float = 0.0,
    logit_limit: float | None = LOGIT_LIMIT,
) -> torch.Tensor:
    """Per-pair preference loss -[p̃·log σ(z) + (1-p̃)·log σ(-z)], shape (B,) (no reduction).

    Args:
        z: (B,) logits, e.g. from `dpo_logits`.
        label: P(w ≻ l) per pair, (B,) or a scalar; None = 1 (hard pair, the paper's case). ½ is a tie: the loss is
            minimised at z = 0 ("neither image should gain on the other").
        flip: read the pair the other way round (p -> 1-p). Diffusion-NPO puts the dispreferred image in the w slot.
        label_noise: "none" (DPO), "conservative" (cDPO) or "unbiased" (rDPO); see the module docstring.
        noise_rate: ε, the assumed probability that a label is flipped. No official value (neither note fixes
            one: it is an estimate of the data's flip rate; TRL's ``label_smoothing`` defaults to 0 and its docs use
            0.1); typical 0.05-0.3. Must be 0 with "none", ≤ ½ for "conservative", < ½ for "unbiased".
        logit_limit: clamp on z, used by the unbiased loss only (default 10; None disables it).

    Why the clamp. For a hard label p'' = (1-ε)/(1-2ε) > 1, so the rDPO loss is
    p''·ℓ(w,l) + (1-p'')·ℓ(l,w) with a *negative* weight on ℓ(l,w) = -log σ(-z) ≈ z for large z: its gradient in z
    is σ(z) - p'' < 0 everywhere, and as z -> ∞ the loss keeps falling linearly with slope -ε/(1-2ε). The
    estimator is unbiased only in expectation over the label noise; per pair, the optimiser can lower it without
    end by inflating one margin (in diffusion, by driving the policy's error on one image down and on the other
    up), which is what the KL anchor of DPO is meant to prevent. So z is clamped on the unbounded side only: to
    at most +L where p̃ > 1, to at least -L where p̃ < 0 (a flipped or p < ε label), and not at all where
    0 ≤ p̃ ≤ 1 (there the loss is a convex mix of two bounded-below terms, minimised at z = logit p̃). Beyond the
    limit the loss is constant and its gradient is exactly 0; pairs on the wrong side keep their full gradient.
    L = 10 is where σ(10) = 1 - 4.5e-5: the clean DPO loss's own gradient is already 4.5e-5 there, so the clamp
    removes a negligible part of the clean objective while stopping the runaway. Typical 5-20 (in units of z).
    """
    if label is None and label_noise == "none":
        _check_noise(label_noise, noise_rate)
        return -F.logsigmoid(-z if flip else z)
    p = torch.as_tensor(1.0 if label is None else label, dtype=z.dtype, device=z.device)
    p = effective_label(p, flip=flip, label_noise=label_noise, noise_rate=noise_rate)
    if label_noise == "unbiased" and logit_limit is not None:
        z = torch.where(p > 1, z.clamp(max=logit_limit), z)
        z = torch.where(p < 0, z.clamp(min=-logit_limit), z)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    label: torch.Tensor | None = None,
    *,
    flip: bool = False,
    label_noise: LabelNoise = "none",
    noise_rate: float = 0.0,
    logit_limit: float | None = LOGIT_LIMIT,
) -> DPOLoss:
    """Diffusion-DPO loss from per-sample errors, each of shape (B,): `pairwise_loss(dpo_logits(...))`, batch mean.

    Args:
        model_err_w, model_err_l: policy errors on winner / loser (per-sample MSE mean over C,H,W).
        ref_err_w, ref_err_l: reference errors on the same x_t, t and ε (no gradient needed).
        beta: β of the -β/2 convention (official 5000; typical 2000-5000).
        label: optional (B,) probability that "w" is really preferred. 1 (default) is the paper's hard
            pair. 0.5 marks a tie: the loss becomes ½[-log σ(z) - log σ(-z)], minimised at z = 0, i.e.
            "neither image should gain on the other". In general -[p·log σ(z) + (1-p)·log σ(-z)].
        flip, label_noise, noise_rate, logit_limit: see `pairwise_loss` (defaults: plain DPO, today's numbers).

    Returns:
        `DPOLoss(loss, logits)` with z = logits = -β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]
        (the unclamped margin, whatever ``label_noise``).
    """
    logits = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    losses = pairwise_loss(logits, label, flip=flip, label_noise=label_noise, noise_rate=noise_rate, logit_limit=logit_limit)
    return DPOLoss(losses.mean(), logits)
