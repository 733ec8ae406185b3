"""Self-NPO: truncated diffusion fine-tuning toward the EMA teacher's negatively guided x0 (objective docstring:
`diffalign.objectives.self_npo`). Not an online method: it trains on the cached images and captions, without labels.

Every image of every cached item is a training example: the captioned-image sources (``captions``, ``toy_scenes``)
hold one per item, and a preference cache's images all count (labels ignored). Per image, from the `self_npo` stream
of the item: the grid index where the chain starts, the forward noise, the re-noising level s and noise ξ. The chain,
per row (vectorised over the batch):

    x ← α_{t0}·x0 + σ_{t0}·ε,  t0 = grid[i0]
    K times (stopping at level 0):  x̂0, ε̂ = guided teacher predictions at (x, t);  x ← √ᾱ_prev·x̂0 + √(1-ᾱ_prev)·ε̂,
                                     t ← the grid point below (ᾱ_prev = ᾱ[grid[i-1]], or ᾱ_0 below the first point)
    target = guided teacher x̂0 at the end state (x_t, t);  s ~ U{t+1, …, T-1};  x_s = renoise(x_t)
    loss = pseudo-Huber(student x̂0(x_s, s, caption), target)

Where the official code differs: it breaks out of the chain without re-evaluating x̂0 when EVERY row of the batch has
reached level 0 (only when all start points are below K, probability (K/N)^batch: 1e-14 at batch 20), leaving a target
one step behind x_t; here the target is always the teacher's x̂0 at x_t. Its student conversion (x_s - σ_s·out)/α_s
assumes ε-prediction; here the UNet's own parametrisation is converted (`to_x0_eps`), as the teacher's is in both.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffalign.config import SelfNPOMethod
from diffalign.diffusion import to_x0_eps
from diffalign.objectives.self_npo import ddim_grid, guided, pseudo_huber, renoise
from diffalign.trainers.methods.base import Needs


class SelfNPO:
    name: ClassVar[str] = "self_npo"
    needs: ClassVar[Needs] = Needs(reference=False, teacher_decay=0.999, preferences=False)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "t_end")

    def __init__(self, cfg: SelfNPOMethod):
        self.cfg = cfg
        self.needs = Needs(reference=False, teacher_decay=cfg.teacher_decay, preferences=False)

    def draws(self, batch, draws, num_train_timesteps: int):
        """Per image: start index i0, forward noise ε, re-noise noise ξ and a uniform u for s (image-major rows)."""
        k, shape, n = batch.k, batch.noise.shape[1:], self.cfg.grid_points

        def draw(g):
            return (torch.randint(0, n, (k,), generator=g), torch.randn((k, *shape), generator=g),
                    torch.randn((k, *shape), generator=g), torch.rand(k, generator=g))

        per_item = draws.per_item("self_npo", draw)
        return [torch.stack([d[j] for d in per_item], dim=1).flatten(0, 1) for j in range(4)]  # (K·B, ...) image-major

    @torch.no_grad()
    def teacher_chain(self, models, x0, start, noise, cond, uncond):
        """(x_t, t, target): K guided DDIM steps of the teacher from the forward-noised x0, and its guided x̂0 at the end."""
        cfg, a_bar = self.cfg, models.schedule.alphas_cumprod
        grid = ddim_grid(cfg.grid_points, len(a_bar))
        a_prev = torch.cat([a_bar[:1], a_bar[grid[:-1]]])  # ᾱ one grid point below each point (ᾱ_0 below the first)
        t_prev = torch.cat([torch.zeros(1, dtype=torch.long), grid[:-1]])
        index = start.clone()
        t = grid[index]
        x = models.schedule.add_noise(x0, noise, t.to(x0.device))
        active = torch.ones_like(index, dtype=torch.bool)
        pred = models.schedule.prediction_type
        for step in range(cfg.teacher_steps + 1):
            x0_c, eps_c = to_x0_eps(models.teacher(x, t, cond).float(), x, t, a_bar, pred)
            x0_u, eps_u = to_x0_eps(models.teacher(x, t, uncond).float(), x, t, a_bar, pred)
            x0_hat = guided(x0_c, x0_u, cfg.guidance)
            if step == cfg.teacher_steps or not active.any():
                break
            eps_hat = guided(eps_c, eps_u, cfg.guidance)
            a = a_prev[index].to(x).view(-1, *([1] * (x.ndim - 1)))
            moved = a.sqrt() * x0_hat + (1 - a).sqrt() * eps_hat
            keep = active.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(keep, moved, x)
            t = torch.where(active, t_prev[index], t)
            active = active & (index > 0)
            index = (index - 1).clamp(min=0)
        return x, t, x0_hat

    def loss(self, models, batch, draws):
        cfg = self.cfg
        T = models.schedule.num_train_timesteps
        images = batch.all_images()  # (B, K)
        start, noise, xi, u = self.draws(batch, draws, T)
        x0 = batch.x0(images).to(models.device, torch.float32)
        cond, uncond = batch.cond(images), batch.unconditional(images, zeros=cfg.uncond == "zeros")
        x_t, t, target = self.teacher_chain(models, x0, start, noise.to(x0), cond, uncond)
        s = t + 1 + (u * (T - 1 - t)).long().clamp(max=T - 2 - t)  # uniform on {t+1, …, T-1}
        x_s = renoise(x_t, t, s, models.schedule.alphas_cumprod, xi.to(x_t))
        x0_pred, _ = to_x0_eps(models.policy(x_s, s, cond).float(), x_s, s, models.schedule.alphas_cumprod, models.schedule.prediction_type)
        loss = pseudo_huber(x0_pred, target, cfg.huber_c) if cfg.loss == "huber" else torch.nn.functional.mse_loss(x0_pred, target)
        device = loss.device  # every metric on the loss's device (the loop reduces them across processes)
        return loss, {"loss": loss.detach(), "t_end": t.float().mean().to(device), "s": s.float().mean().to(device),
                      "x0_mse": torch.nn.functional.mse_loss(x0_pred.detach(), target)}
