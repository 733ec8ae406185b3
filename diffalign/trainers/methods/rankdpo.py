"""RankDPO (Karthik et al., arXiv:2410.18013; reconstructed from the paper's algorithm box, no official code).

All K images of an item are scored with one batched forward of the policy and one of the reference:
s_i = e_θ(x^i) − e_ref(x^i) (lower = preferred by the policy relative to the reference). Every pair i ≻ j (by φ) adds
Δ_ij · −log σ(−β/2 · (s_i − s_j)), Δ_ij = |2^φ_i − 2^φ_j| · |1/D(τ(i)) − 1/D(τ(j))|, D(r) = log_b(1 + r)
(`diffalign.objectives.rankdpo_loss`). β is in our convention (the paper writes β without the ½), so K = 2 is
Δ_12 × Diffusion-DPO at the same β. φ is the item's `scores` (the Syn-Pic win-rate for a synthetic cache, with
`data.phi_ties`); items with ranks but no scores use their ranks' win-rate. The ranks in the discount come from φ
('label') or from the current model's s ('model'). Noise is shared by the K images or drawn per image.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffalign.config import RankDPOMethod
from diffalign.objectives import rank_positions, rankdpo_loss
from diffalign.rewards import phi as rewards_phi
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import denoising_errors, errors_at


class RankDPO:
    name: ClassVar[str] = "rankdpo"
    needs: ClassVar[Needs] = Needs(reference=True)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "pair_acc")

    def __init__(self, cfg: RankDPOMethod):
        self.cfg = cfg

    def loss(self, models, batch, draws):
        cfg, images = self.cfg, batch.all_images()
        if cfg.noise == "shared":
            err = denoising_errors(models, batch, images)
        else:
            x0, t = batch.x0(images), batch.timesteps(batch.k)
            shape = (batch.k, *batch.noise.shape[1:])
            noise = torch.stack(draws.per_item("image_noise", lambda g: torch.randn(shape, generator=g)), dim=1).flatten(0, 1)  # image-major
            err = errors_at(models, batch, images, models.schedule.add_noise(x0, noise, t), models.schedule.target(x0, noise, t), t)
        s = err.policy - err.reference  # (B, K)
        phi = batch.scores.to(s.device)
        missing = ~torch.isfinite(phi).all(dim=1)
        if missing.any():
            from_ranks = rewards_phi(-batch.ranks[None].float())  # the ranks' win-rate: one "scorer" scoring -rank, ties ½
            phi = torch.where(missing[:, None], from_ranks.to(s.device, s.dtype), phi)
        ranks = rank_positions(phi if cfg.discount_ranks == "label" else -s.detach())  # 1 = best: highest φ, or lowest s
        out = rankdpo_loss(s, phi, ranks, beta=cfg.beta / 2, log_base=cfg.log_base, reduction=cfg.reduction)
        better = phi[:, :, None] > phi[:, None, :]  # pairs i ≻ j by φ
        agree = (s.detach()[:, :, None] < s.detach()[:, None, :]) & better
        return out.loss, {
            "loss": out.loss.detach(),
            "pair_acc": agree.sum() / better.sum().clamp(min=1),  # the policy's implicit order agrees with φ
            "model_mse": err.policy.detach().mean(),
            "ref_mse": err.reference.mean(),
        }
