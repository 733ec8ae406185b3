"""Inverted latents for the inversion methods (InPO, SmPO): x̃_t from the cached x_0 by inverting the sampler with a UNet.

The conditioning is the training step's own (caption dropout applied, as the official code inverts with the same
caption it trains on), without CFG and without gradients; the UNet is the policy (official) or the reference. The
injected noise (InPO's η) is drawn per item from the counter-based `inversion` stream, one draw per image, so a
resumed run inverts identically. The math (grids, ReNoise, the implied noise) is `diffalign.diffusion.invert`.
"""

from __future__ import annotations

import contextlib

import torch

from diffalign.diffusion import invert
from diffalign.randomness import Draws
from diffalign.trainers.batch import LatentBatch
from diffalign.trainers.models import Models


def inverted_latents(models: Models, batch: LatentBatch, images: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, draws: Draws, *,
                     steps: int, semantics: str, model: str, eta: float = 0.0, renoise: bool = False) -> torch.Tensor:
    """(n·B, C, h, w) latents inverted from `x0` (image-major rows of `images`) toward each row's level `t`."""
    n = images.shape[1]
    cond = batch.cond(images).to(models.device, models.dtype)
    unet = models.policy if model == "policy" else models.reference

    @torch.no_grad()
    def predict(x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return unet(x, s, cond.select(rows)).float()

    noise = None
    if eta > 0:
        shape = (steps, n, *x0.shape[1:])
        per_item = torch.stack(draws.per_item("inversion", lambda g: torch.randn(shape, generator=g)), dim=2)  # (steps, n, B, ...)
        noise = per_item.flatten(1, 2).to(models.device)  # (steps, n·B, ...), image-major
    x0 = x0.to(models.device, torch.float32)
    with models.reference_session() if model == "reference" else contextlib.nullcontext():  # LoRA: adapters off once, not per call
        return invert(x0, t.to(models.device), predict, models.schedule.alphas_cumprod.to(models.device), num_steps=steps,
                      semantics=semantics, eta=eta, noise=noise, renoise=renoise, prediction_type=models.schedule.prediction_type)
