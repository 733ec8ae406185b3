"""The denoising errors every forward-noising offline method starts from.

For the chosen images of each item (index tensor (B, n) of slots), x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε with the item's
shared t and ε; e = per-sample MSE (mean over C, H, W) between the UNet's prediction and its target (ε, or v).
One batched forward of the policy over all n·B rows, one of the reference on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.diffusion import per_sample_mse
from diffalign.trainers.batch import LatentBatch, per_image
from diffalign.trainers.models import Models


@dataclass
class Errors:
    policy: torch.Tensor  # (B, n), with gradients
    reference: torch.Tensor | None  # (B, n), no gradients; None when not asked for


def denoising_errors(models: Models, batch: LatentBatch, images: torch.Tensor, reference: bool = True) -> Errors:
    """Policy (and reference) errors of the chosen images, shape (B, n), from one batched forward each."""
    n = images.shape[1]
    x0, t, noise = batch.x0(images), batch.timesteps(n), batch.shared_noise(n)
    x_t = models.schedule.add_noise(x0, noise, t)
    return errors_at(models, batch, images, x_t, models.schedule.target(x0, noise, t), t, reference)


def errors_at(models: Models, batch: LatentBatch, images: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
              reference: bool = True) -> Errors:
    """Errors of the chosen images' rows (image-major, n·B) at given x_t, target and t: for methods that form x_t another
    way than forward noising (e.g. by inversion, with the back-solved noise as the target)."""
    n = images.shape[1]
    cond = batch.cond(images).to(models.device, models.dtype)
    x_t, t, target = x_t.to(models.device, models.dtype), t.to(models.device), target.to(models.device)
    policy = per_sample_mse(models.policy(x_t, t, cond), target)
    ref = per_sample_mse(models.reference(x_t, t, cond), target) if reference else None
    return Errors(per_image(policy, n), None if ref is None else per_image(ref, n))
