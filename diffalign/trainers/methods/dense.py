"""Dense-reward temporal discounting (Yang, Chen, Zhou, ICML 2024) in an offline form on the latent-pair cache.

Reconstructed: the official code is online (rollouts, per-step Gaussian log-prob ratios); here the step term is the
Diffusion-DPO logit at the training level t, and k is the reverse-chain step of a `num_steps` DDIM chain whose interval
holds t (k = 0 the noisiest step, `diffalign.objectives.dense`). Two different objectives:
- 'weighted': −log σ(γ^k · z), z the Diffusion-DPO logit (γ = 1 is Diffusion-DPO);
- 'sampled': t drawn with probability ∝ γ^k(t) (the official code samples its steps ∝ γ^k), then the plain DPO loss.
The official log-ratio clip (1e-4 on mean Gaussian log-prob ratios) has no counterpart on MSE differences and is not
reproduced. The shared pairwise objective's label-noise options apply.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from diffalign.config import DenseMethod
from diffalign.objectives import dense_dpo_loss, discounted_timestep_probs, dpo_loss
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import denoising_errors
from diffalign.trainers.methods.dpo import pairwise_metrics


class Dense:
    name: ClassVar[str] = "dense"
    needs: ClassVar[Needs] = Needs(reference=True)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "implicit_acc")

    def __init__(self, cfg: DenseMethod):
        self.cfg = cfg

    def loss(self, models, batch, draws):
        cfg = self.cfg
        T = models.schedule.num_train_timesteps
        if cfg.variant == "sampled":  # the item's t, redrawn ∝ γ^k from its own stream
            probs = discounted_timestep_probs(cfg.gamma, cfg.num_steps, T)
            t = torch.cat(draws.per_item("discounted_timestep", lambda g: torch.multinomial(probs, 1, generator=g)))
            batch = dataclasses.replace(batch, t=t)
        pair = batch.pair()
        err = denoising_errors(models, batch, pair.images)
        (m_w, m_l), (r_w, r_l) = err.policy.unbind(1), err.reference.unbind(1)
        pairwise = dict(label=pair.label.to(m_w.device), **cfg.pairwise_options())
        if cfg.variant == "weighted":
            out = dense_dpo_loss(m_w, m_l, r_w, r_l, cfg.beta, batch.t.to(m_w.device), cfg.gamma, num_steps=cfg.num_steps,
                                 num_train_timesteps=T, **pairwise)
        else:
            out = dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, **pairwise)
        return out.loss, pairwise_metrics(out, m_w, m_l, r_w, r_l)
