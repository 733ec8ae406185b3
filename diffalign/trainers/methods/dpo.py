"""Diffusion-DPO (Wallace et al., 2023): the pairwise loss on the trained pair's denoising errors.

The pair (winner, loser, P(winner preferred)) comes from the batch (`LatentBatch.pair`); soft labels and kept
ties reach `diffalign.objectives.dpo_loss` as they are. The objective's docstring has the equation.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffalign.config import DPOMethod, NPOMethod
from diffalign.objectives import dpo_loss
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import denoising_errors


class DPO:
    name: ClassVar[str] = "dpo"
    needs: ClassVar[Needs] = Needs(reference=True)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "implicit_acc")

    def __init__(self, cfg: DPOMethod | NPOMethod):
        self.cfg = cfg

    def loss(self, models, batch, draws):
        cfg, pair = self.cfg, batch.pair()
        err = denoising_errors(models, batch, pair.images)
        (m_w, m_l), (r_w, r_l) = err.policy.unbind(1), err.reference.unbind(1)
        out = dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, label=pair.label.to(m_w.device), **cfg.pairwise_options())
        return out.loss, pairwise_metrics(out, m_w, m_l, r_w, r_l)


def pairwise_metrics(out, m_w, m_l, r_w, r_l) -> dict[str, torch.Tensor]:
    """What every pairwise method logs: loss, implicit accuracy (a zero margin counts ½), mean margin, policy/ref MSE."""
    z = out.logits.detach()
    return {
        "loss": out.loss.detach(),
        "implicit_acc": ((z > 0).float() + 0.5 * (z == 0).float()).mean(),
        "reward_margin": z.mean(),
        "model_mse": 0.5 * (m_w.detach().mean() + m_l.detach().mean()),
        "ref_mse": 0.5 * (r_w.mean() + r_l.mean()),
    }
