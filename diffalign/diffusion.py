"""Schedule math below the training loop: posterior sampling, forward noising and targets.

Notation (code -> DDPM): ``alphas_cumprod[t]`` = ᾱ_t; x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε; the ε-target is ε,
the v-target (Salimans & Ho, 2022) is v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0.
"""

from __future__ import annotations

import torch


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A fresh VAE latent z = μ + σ·n from a cached diagonal Gaussian posterior (σ = exp(½·logvar))."""
    return mean + torch.exp(0.5 * logvar) * noise


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].float()
    return out.view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, per sample (timesteps: (B,) long)."""
    a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to predict: ε ('epsilon') or v ('v_prediction')."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected 'epsilon' or 'v_prediction'")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,): squared error mean over C, H, W, in fp32 (the official reduction)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
