"""DDIM-InPO (Lu et al., CVPR 2025): the Diffusion-DPO loss on DDIM-inverted latents with the back-solved target.

Each image of the trained pair is inverted from its x_0 toward the item's level t (`inversion.py`); the target is the
implied noise τ = (x̃_t − √ᾱ_t·x_0)/√(1−ᾱ_t) at t (as the official code, whatever grid level the latent reached), and
the errors feed the shared pairwise objective (`diffalign.objectives.dpo_loss`, label-noise options included). With
forward noising in place of the inversion, τ = ε and the loss is Diffusion-DPO's exactly (tests/test_offline_methods.py).
"""

from __future__ import annotations

from typing import ClassVar

from diffalign.config import InPOMethod
from diffalign.diffusion import implied_noise
from diffalign.objectives import dpo_loss
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import errors_at
from diffalign.trainers.methods.dpo import pairwise_metrics
from diffalign.trainers.methods.inversion import inverted_latents


class InPO:
    name: ClassVar[str] = "inpo"
    needs: ClassVar[Needs] = Needs(reference=True)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "implicit_acc")

    def __init__(self, cfg: InPOMethod):
        self.cfg = cfg

    def loss(self, models, batch, draws):
        cfg, pair = self.cfg, batch.pair()
        x0, t = batch.x0(pair.images), batch.timesteps(2)
        x_t = inverted_latents(models, batch, pair.images, x0, t, draws, steps=cfg.inversion_steps, semantics=cfg.grid_semantics,
                               model=cfg.inversion_model, eta=cfg.inversion_eta)
        x0, t = x0.to(x_t.device), t.to(x_t.device)
        tau = implied_noise(x_t, x0, t, models.schedule.alphas_cumprod)
        target = models.schedule.target(x0, tau, t)
        err = errors_at(models, batch, pair.images, x_t, target, t)
        (m_w, m_l), (r_w, r_l) = err.policy.unbind(1), err.reference.unbind(1)
        out = dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, label=pair.label.to(m_w.device), **cfg.pairwise_options())
        return out.loss, pairwise_metrics(out, m_w, m_l, r_w, r_l)
