"""Dense-reward / temporal discounting (Yang, Chen, Zhou, ICML 2024, arXiv 2402.08265), offline form (reconstructed).

Paper (abstract): "temporal discounting into DPO-style explicit-reward-free objectives, to break the temporal
symmetry", emphasising "the initial steps of the T2I reverse chain". Official code
(``Shentao-YANG/Dense_Reward_T2I``, online: 50-step DDIM rollouts, η = 1, CFG 7.5)::

    w_k = γ^k / Σ_{j<50} γ^j,   k_1..k_K ~ Categorical(w)           (k = 0 is the first reverse step, t = 981)
    ℓ(traj) = τ_PL · (1/K) Σ_i clip(log π_θ(x_{k_i+1}|x_{k_i}) - log π_I(x_{k_i+1}|x_{k_i}), -c, c)
    L = -log σ(ℓ(traj_w) - ℓ(traj_l))                               (ListMLE with M = 2)

i.e. a Monte-Carlo estimate of -log σ(τ_PL Σ_k w_k [Δ_k(w) - Δ_k(l)]). The offline counterpart replaces the
per-step Gaussian log-ratio by Diffusion-DPO's error difference at a training timestep t (the usual ELBO
surrogate), which needs the reverse-chain step index k of t. Two variants:

(a) `dense_logit_weight` / `dense_dpo_loss`: z -> γ^{k(t)}·z inside σ, t drawn as usual (uniform). This is the
    paper's un-normalised Σ_k γ^k Δ_k with the weight kept inside the sigmoid, as Diffusion-DPO keeps T·ω(λ_t).
    γ = 1 is Diffusion-DPO exactly. The mean multiplier over steps is (1 - γ^N)/(N(1 - γ)) ≈ 0.199 for γ = 0.9,
    N = 50 (and γ^49 ≈ 0.0057 on the last step), so at equal β the objective is much softer than DPO; raise β to
    compensate if a DPO-like margin scale is wanted.
(b) `discounted_timestep_probs`: the official code's choice, sampling instead of weighting. A (T,) distribution
    with per-step mass w_k = γ^k / Σ_j γ^j, spread uniformly over the step's timesteps; draw t from it and use the
    plain DPO loss. With one draw per pair this is the official multi-prompt estimator (K = 1) in offline form.

The t -> k mapping. diffusers' DDIM grid with "leading" spacing and steps_offset 1 visits t_k = (N-1-k)·T/N + 1
(T = 1000, N = 50: t_k = 981 - 20k; k = 0 the noisiest step, k = 49 at t = 1). Any training t ∈ [0, T) is assigned
to the grid step whose bin contains it, the bins being the N equal slices of [0, T)::

    k(t) = (N - 1) - floor(t·N / T)            (T = 1000, N = 50: t ∈ [980, 1000) -> k = 0, t ∈ [960, 980) -> k = 1, ..., t ∈ [0, 20) -> k = 49)

Each bin holds exactly one grid timestep (t_k = the bin's start + 1, for T/N ≥ 2), every step gets T/N timesteps (so "uniform
within the step" in (b) is uniform on a bin), and t above the top grid point (982..999) belongs to the first step.
Do not index γ by t itself: k counts from the start of generation, so γ < 1 favours the *noisiest* timesteps.

Not reproduced: the official per-step log-ratio clip (±1e-4, ``log_ratio_clip``, on the C,H,W-*mean* Gaussian
log-prob ratio log π_θ - log π_I of a sampled transition). It is a trust region on a quantity that does not
exist here: Diffusion-DPO's error differences are an ELBO surrogate on a different scale, with no calibrated
counterpart of 1e-4, so a clamp at any value would be a new hyperparameter rather than the official one.

Notation (code -> paper): ``timesteps`` = t; ``k`` = step index in the reverse chain; ``gamma`` = γ (discount);
``num_steps`` = N (DDIM steps of the chain); ``num_train_timesteps`` = T; ``beta`` = β of `dpo_loss` (the role of
τ_PL); the per-step log-ratio Δ_k is replaced by the DPO error difference at t.
"""

from __future__ import annotations

import torch

from diffalign.objectives.dpo import DPOLoss, dpo_logits, pairwise_loss


def _check(gamma: float, num_steps: int, num_train_timesteps: int) -> None:
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_steps <= num_train_timesteps, got {num_steps}, {num_train_timesteps}")


def step_index(timesteps: torch.Tensor, num_steps: int = 50, num_train_timesteps: int = 1000) -> torch.Tensor:
    """k(t) = (N - 1) - floor(t·N / T): the reverse-chain step (0 = noisiest) whose bin holds t. Long, shape of t.

    Args:
        timesteps: integer training timesteps in [0, T).
        num_steps: N, DDIM steps of the chain (official 50; typical 20-100).
        num_train_timesteps: T (1000 for SD1.5 / SDXL).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_steps <= num_train_timesteps, got {num_steps}, {num_train_timesteps}")
    t = torch.as_tensor(timesteps).long()
    if ((t < 0) | (t >= num_train_timesteps)).any():
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps})")
    return (num_steps - 1) - torch.div(t * num_steps, num_train_timesteps, rounding_mode="floor")


def dense_logit_weight(k: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ^k, the factor on the DPO logit for step k (float64; cast as needed).

    ``gamma``: γ, the discount (official 0.9; typical 0.8-1; 1 = no discount = Diffusion-DPO)."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64))


def dense_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    timesteps: torch.Tensor,
    gamma: float = 0.9,
    *,
    num_steps: int = 50,
    num_train_timesteps: int = 1000,
    label: torch.Tensor | None = None,
    **pairwise,
) -> DPOLoss:
    """Variant (a): -[p·log σ(γ^{k(t)}·z) + (1-p)·log σ(-γ^{k(t)}·z)], batch mean; z = `dpo_logits` (all (B,)).

    Args:
        beta: β of `dpo_loss` (-β/2 convention; typical 2000-5000, scaled up if the softer logit should be offset).
        timesteps: (B,) the training t of each pair (shared by winner and loser).
        gamma: γ (official 0.9; typical 0.8-1).
        num_steps, num_train_timesteps: N (official 50) and T (1000) of the t -> k mapping.
        label: optional soft label / tie, as `dpo_loss`.
        pairwise: the shared pairwise objective's options (`flip`, `label_noise`, `noise_rate`, `logit_limit`).

    Returns:
        `DPOLoss(loss, logits)` with logits = γ^{k(t)}·z.
    """
    z = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    k = step_index(timesteps, num_steps, num_train_timesteps)
    logits = dense_logit_weight(k, gamma).to(dtype=z.dtype, device=z.device) * z
    return DPOLoss(pairwise_loss(logits, label, **pairwise).mean(), logits)


def discounted_timestep_probs(gamma: float, num_steps: int = 50, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Variant (b): (T,) float64 probabilities over t, P(t) = γ^{k(t)} / (n_{k(t)} · Σ_j γ^j), n_k = #timesteps of step k.

    Sums to 1; the mass of step k is γ^k / Σ_j γ^j (the official ``policy_loss_weights``). Draw with
    ``torch.multinomial(probs, B, replacement=True)`` and train with the plain DPO loss. Arguments as
    `dense_dpo_loss` (γ official 0.9, N official 50, T = 1000)."""
    _check(gamma, num_steps, num_train_timesteps)
    k = step_index(torch.arange(num_train_timesteps), num_steps, num_train_timesteps)
    per_step = dense_logit_weight(torch.arange(num_steps), gamma)
    per_step = per_step / per_step.sum()
    counts = torch.bincount(k, minlength=num_steps).to(torch.float64)
    return per_step[k] / counts[k]


def listmle_loss(logits: torch.Tensor) -> torch.Tensor:
    """ListMLE (Xia et al. 2008) of lists whose items are ordered best first, (B, M) -> (B,): the negative log-likelihood
    of that order under Plackett–Luce,

        L = −Σ_{i=1}^{M} [ ℓ_i − log Σ_{j≥i} exp ℓ_j ],

    the loss of the official online dense-reward code (allRank's `listMLE` after sorting by reward). For M = 2 it is
    −log σ(ℓ_1 − ℓ_2), the DPO form."""
    tail = torch.logcumsumexp(logits.flip(-1), dim=-1).flip(-1)  # log Σ_{j≥i} exp ℓ_j
    return (tail - logits).sum(-1)


def dense_online_logits(log_ratio: torch.Tensor, clip: float, temperature: float) -> torch.Tensor:
    """ℓ = τ · mean_k clamp(log π_θ − log π_I, ±c) over a trajectory's K drawn steps, (..., K) -> (...). The clamp is hard
    (no gradient outside ±c: an implicit trust region), as the official code's."""
    return temperature * log_ratio.clamp(-clip, clip).mean(-1)
