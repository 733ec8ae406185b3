"""SmPO-Diffusion (Lu et al., ICML 2025): the DPO logit times γ(2p−1) on ReNoise-inverted latents.

p is the smoothed probability that the reward's winner wins: the softmax of the min-max-normalised reward scores of
the pair (`diffalign.objectives.smpo_probability`), per pair (the official code uses the first pair's p for its whole
micro-batch, right only at batch size 1). With `label_source: reward` (official) the pair is ordered by the reward and
the human label only drops ties (the data's `ties: drop`); with `human` the data's pair is kept and p < ½ where the
reward disagrees. The normalisation bounds are `score_bounds`, or the range of the reward over the whole cache
(`use_data`). Equal scores give p = ½: loss log 2 and zero gradient.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from diffalign.config import SmPOMethod
from diffalign.diffusion import implied_noise
from diffalign.objectives import smpo_loss, smpo_probability
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import errors_at
from diffalign.trainers.methods.dpo import pairwise_metrics
from diffalign.trainers.methods.inversion import inverted_latents


class SmPO:
    name: ClassVar[str] = "smpo"
    needs: ClassVar[Needs] = Needs(reference=True)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "implicit_acc", "p")

    def __init__(self, cfg: SmPOMethod):
        self.cfg = cfg
        self.bounds = cfg.score_bounds

    def use_data(self, dataset) -> None:
        """Without `score_bounds`, normalise by the reward's range over the whole cache (NaNs ignored)."""
        table = dataset.score_table(self.cfg.reward)
        if not np.isfinite(table).any():
            raise ValueError(f"method smpo: the cache has no {self.cfg.reward or 'item'} scores to order pairs and set p")
        if self.bounds is None:
            self.bounds = (float(np.nanmin(table)), float(np.nanmax(table)))

    def loss(self, models, batch, draws):
        cfg, pair = self.cfg, batch.pair()
        scores = batch.scores if cfg.reward is None else batch.extra_scores[cfg.reward]
        rows = torch.arange(batch.size)
        winner, loser = pair.winner, pair.loser
        if cfg.label_source == "reward":  # order by the reward: the higher-scored image is the winner
            swap = scores[rows, loser] > scores[rows, winner]
            winner, loser = torch.where(swap, loser, winner), torch.where(swap, winner, loser)
        images = torch.stack([winner, loser], dim=1)
        p = smpo_probability(scores[rows, winner], scores[rows, loser], *self.bounds)
        if not torch.isfinite(p).all():
            raise ValueError(f"method smpo: items {batch.item_id.tolist()} lack {cfg.reward or 'item'} scores")
        x0, t = batch.x0(images), batch.timesteps(2)
        x_t = inverted_latents(models, batch, images, x0, t, draws, steps=cfg.inversion_steps, semantics=cfg.grid_semantics,
                               model=cfg.inversion_model, renoise=True)
        x0, t = x0.to(x_t.device), t.to(x_t.device)
        target = models.schedule.target(x0, implied_noise(x_t, x0, t, models.schedule.alphas_cumprod), t)
        err = errors_at(models, batch, images, x_t, target, t)
        (m_w, m_l), (r_w, r_l) = err.policy.unbind(1), err.reference.unbind(1)
        out = smpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, p=p.to(m_w.device), gamma=cfg.gamma)
        return out.loss, {**pairwise_metrics(out, m_w, m_l, r_w, r_l), "p": p.mean()}
