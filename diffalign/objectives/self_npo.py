"""Self-NPO (Wang et al., AAAI 2026, arXiv:2505.11777): truncated diffusion fine-tuning against an EMA teacher.

Official code: ``G-U-N/Diffusion-NPO`` ``Self-NPO/train.py`` (SD1.5) and ``train_xl.py`` (SDXL), read at 70061e3.

Notation (code -> paper): α_t = √ᾱ_t, σ_t = √(1-ᾱ_t), ρ_t = σ_t/α_t (the noise-to-signal ratio); x̂0 = the x0
prediction of a UNet output (ε: (x_t - σ_t·ε̂)/α_t); w = the guidance weight in the official *x0 convention*
``x̂0 = x̂0_c + w·(x̂0_c - x̂0_u)`` (w = -1: the unconditional prediction; w = -5: 5·x̂0_u - 4·x̂0_c). In diffusers'
ε convention ε_u + g·(ε_c - ε_u) this is g = w + 1 (0 and -4).

One training example (`diffalign.trainers.methods.self_npo` runs the chain):

1. a real latent x0 is forward-noised to a point t0 of an N-point DDIM grid (official N = 25: t ∈ {39, 79, …, 999});
2. the EMA teacher takes K deterministic DDIM steps down the grid with guidance w (official K = 5), each step
   x' = √ᾱ_prev·x̂0 + √(1-ᾱ_prev)·ε̂ with x̂0, ε̂ guided alike; the chain stops at level 0;
3. the target is the teacher's guided x̂0 at the end state x_t (Tweedie's estimate E[x0 | x_t]);
4. x_t is re-noised to a level s ~ U{t+1, …, T-1} in a way that keeps the marginal (`renoise`);
5. the student predicts x̂0 at (x_s, s, caption) and the loss is the pseudo-Huber distance (`pseudo_huber`).
"""

from __future__ import annotations

import torch


def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast over `like` (B, ...)."""
    return table.to(like.device, torch.float32)[t.to(like.device).long()].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def renoise(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_s = α_s·(x_t/α_t + √(ρ_s² - ρ_t²)·ξ), ξ = `noise` ~ N(0, I), for s > t (official train.py, ``sampled_x``).

    Given x_t, x_s has mean (α_s/α_t)·x_t and variance α_s²·(ρ_s² - ρ_t²) = σ_s² - σ_t²·α_s²/α_t²: if x_t is on the
    forward marginal at t (x_t = α_t·x0 + σ_t·ε), x_s = α_s·x0 + α_s·(ρ_t·ε + √(ρ_s² - ρ_t²)·ξ) is on it at s.
    Noising from x0 or from the teacher's x̂0 instead would not keep x_t's own content."""
    a_bar = alphas_cumprod.to(torch.float64)
    alpha, rho = a_bar.sqrt(), ((1 - a_bar) / a_bar).sqrt()
    a_t, a_s = _at(alpha, t, x_t), _at(alpha, s, x_t)
    spread = (_at(rho, s, x_t) ** 2 - _at(rho, t, x_t) ** 2).clamp(min=0).sqrt()
    return a_s * (x_t / a_t + spread * noise)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√((pred - target)² + c²) - c) over every element (official ``--loss_type huber``, c = ``--huber_c`` 1e-3)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """cond + w·(cond - uncond): the official guidance form, used on x̂0 and on ε̂ alike."""
    return cond + w * (cond - uncond)


def ddim_grid(num_points: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The official DDIMSolver grid: (1..N)·(T // N) - 1, e.g. N = 25: 39, 79, …, 999."""
    step = num_train_timesteps // num_points
    return torch.arange(1, num_points + 1) * step - 1
