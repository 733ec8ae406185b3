"""Supervised fine-tuning on the preferred image only (the Diffusion-DPO paper's SFT baseline).

    L(θ) = E ‖ε_w - ε_θ(x_w,t, t)‖²

Official code (``--sft``): the preferred image of each pair, plain ``F.mse_loss`` (mean over batch, C, H, W;
with equal-sized samples this is the batch mean of per-sample means). No reference model.
"""

from __future__ import annotations

import torch


def sft_loss(model_err_w: torch.Tensor) -> torch.Tensor:
    """Mean of the per-sample winner errors (B,) (per-sample MSE mean over C,H,W) -> scalar."""
    return model_err_w.mean()
