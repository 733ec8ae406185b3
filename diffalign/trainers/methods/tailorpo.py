"""TailorPO and TailorPO-G (Ren, Zhang, Liu, Zhang, Tian; arXiv:2502.01667, the ICLR 2025 submission's full text;
research/tailorpo.md). RECONSTRUCTED: no public code exists; every choice the paper leaves open is a config option.

Rollout (ours to write, from the paper's description). Each trajectory runs S DDIM steps (η = 1) with CFG. At each
trained step k (`trained_steps` evenly spaced from the first: 0, 4, 8, 12, 16 of 20, the paper's t index 20 ... 4) the
parent x_k gets `children` children x_{k+1} ~ π_θ(·|x_k, c); each child's step-wise reward is the reward of its
predicted x̂0 (Eq. 12: r_t(c, x_t) ≈ r(c, x̂0(x_t)), x̂0 from `x0_from`'s ε at the child's level); the best child is the
winner x^w, the worst the loser x^l (no threshold in the paper), and the winner continues (greedy; `continuation:
random` is SPO's choice). Under TailorPO-G (`guidance: true`, Algorithm 1, Eqs. 13-14) the winner is first moved to

    x⁺ = x^w − η_t·∇_x (r_high − r(c, x̂0(x)))² |_{x = x^w},   r_high = r(c, x̂0(x^w)) + δ

(= x^w + 2δη_t·∇_x r at that point), accepted only if the reward rises; η_t follows a cosine schedule over
`guidance_step`, larger at smaller t. The gradient runs through the UNet's x̂0, the VAE decoder and the scorer's tensor
path, so the reward must be differentiable there.

Loss (Eq. 10), per stored pair, with the shared pairwise objective (`objectives.pairwise_loss`: label smoothing and
the robust loss through `label_noise`):

    z = β·[(log π_θ(x^w|x_k) − log π_ref(x^w|x_k)) − (log π_θ(x^l|x_k) − log π_ref(x^l|x_k))],   L = −log σ(z)

log-probs of the CFG-combined DDIM step (means over dims); `ratio_clamp` (SPO's and D3PO's, not the paper's) clamps each
ratio π_θ/π_ref to [1−c, 1+c] first. Defaults the paper leaves open follow D3PO, which it says it follows (β 0.1, CFG 5,
lr 3e-5), with the ratio clamp off. The other steps sample one child (`untrained_steps: sample`) or step
deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.config.methods import TailorPOMethod
from diffalign.diffusion import ddim_step, ddim_step_with_logprob, to_x0_eps
from diffalign.objectives.dpo import pairwise_loss
from diffalign.randomness import item_generator
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.online import each_trajectory_once
from diffalign.trainers.rollout import Trajectories, decode, guided_prediction


@dataclass
class ChildPairs:
    """B stored pairs: trajectory `rows[i]` at its trained step `steps[i]`, winner and loser children."""

    traj: Trajectories
    rows: torch.Tensor  # (B,)
    steps: torch.Tensor  # (B,)
    winners: torch.Tensor  # (B, C, h, w)
    losers: torch.Tensor  # (B, C, h, w)
    keep: torch.Tensor  # (B,) bool: the reward gap passed the threshold

    @property
    def draws_key(self) -> tuple[list[int], list[int]]:
        return self.traj.slots[self.rows].tolist(), self.traj.prompt_ids[self.rows].tolist()


def trained_chain_steps(sampling_steps: int, trained: int) -> torch.Tensor:
    """The trained steps, evenly spaced from the first: 20 steps, 5 trained -> 0, 4, 8, 12, 16."""
    stride = max(1, sampling_steps // trained)
    return torch.arange(0, sampling_steps, stride)[:trained]


def push_step(k: int, steps: int, low: float, high: float) -> float:
    """η_t of TailorPO-G: a cosine schedule from `low` at the first (noisiest) step to `high` at the last."""
    return low + (high - low) * (1 - math.cos(math.pi * k / max(steps - 1, 1))) / 2


class TailorPO:
    name: ClassVar[str] = "tailorpo"
    needs: ClassVar[Needs] = Needs(reference=True, feed="prompts", rewards=True, preferences=False)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "reward", "reward_gap")

    def __init__(self, cfg: TailorPOMethod):
        self.cfg = cfg

    def scorer_names(self) -> list[str]:
        return [self.cfg.reward]

    def steps_per_round(self, round_size: int, per_step: int, local: int) -> int:
        return each_trajectory_once(round_size, per_step)

    # ------------------------------------------------------------------------------------------ rollouts

    def _lookahead(self, feed, models, x: torch.Tensor, t_prev: torch.Tensor, cond, uncond) -> torch.Tensor:
        """The x0 that latents x at level t_prev reach by `lookahead_steps` deterministic DDIM steps on an evenly spaced
        sub-grid of the remaining levels (t_prev first, then down to the end)."""
        grid, cfg = feed.grid, self.cfg
        levels = torch.cat([t_prev.reshape(1), grid.prev_timesteps[grid.prev_timesteps < t_prev]])
        levels = levels[levels >= 0]
        picks = levels[torch.linspace(0, len(levels) - 1, min(cfg.lookahead_steps, len(levels))).round().long()]
        net = models.reference if cfg.x0_from == "reference" else models.policy
        alphas = grid.alphas_cumprod.to(x.device)
        for i, t in enumerate(picks):
            after = picks[i + 1] if i + 1 < len(picks) else torch.tensor(-1)
            eps = guided_prediction(net, x, t.reshape(1), cond, uncond, cfg.cfg_scale)
            x = ddim_step(eps, x, t, after, alphas, grid.prediction_type, grid.final_alpha_cumprod)
        return x

    def _reward(self, feed, models, x: torch.Tensor, t_prev: torch.Tensor, cond, uncond, prompts, grad: bool = False):
        """r(c, x̂0(x)) of latents x at level t_prev (−1: x is already x0); with `grad`, differentiable in x. With
        `lookahead_steps`, x̂0 is where x leads by that many deterministic DDIM steps instead."""
        grid, cfg = feed.grid, self.cfg
        if int(t_prev) < 0:
            x0 = x
        elif cfg.lookahead_steps and not grad:
            x0 = self._lookahead(feed, models, x, t_prev, cond, uncond)
        else:
            net = models.reference if cfg.x0_from == "reference" else models.policy
            eps = guided_prediction(net, x, t_prev.reshape(1), cond, uncond, cfg.cfg_scale)
            x0, _ = to_x0_eps(eps, x, t_prev, grid.alphas_cumprod.to(x.device), grid.prediction_type)
        vae = feed.components.vae
        if grad:
            images = ((vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.float() + 1) / 2).clamp(0, 1)
        else:
            images = decode(vae, x0.detach(), vae.config.scaling_factor).to(x.device)
        return feed.scorers[cfg.reward].score(images, prompts)["overall"].to(x.device).float()

    def _push(self, feed, models, x, t_prev, cond, uncond, prompts, k, reward):
        """TailorPO-G: x⁺ = x + 2δη_t·∇_x r, kept per row where the reward rises."""
        cfg = self.cfg
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self._reward(feed, models, x_in, t_prev, cond, uncond, prompts, grad=True)
            if not r.requires_grad:
                raise ValueError(f"method.guidance (TailorPO-G) needs a differentiable reward: {cfg.reward!r} has no gradient "
                                 "through its tensor path")
            (grad,) = torch.autograd.grad(r.sum(), x_in)
        step = push_step(k, feed.grid.steps, *cfg.guidance_step)
        pushed = (x + 2 * cfg.guidance_delta * step * grad).detach()
        new = self._reward(feed, models, pushed, t_prev, cond, uncond, prompts)
        better = new > reward
        shape = (-1, *([1] * (x.ndim - 1)))
        return torch.where(better.view(shape), pushed, x), torch.where(better, new, reward), better

    @torch.no_grad()
    def sample(self, models, feed, r: int, slots: list[int], prompt_ids: list[int], prompts: list[str], cond, uncond,
               init: torch.Tensor, noise: torch.Tensor):
        """(latents (N, S+1), log-probs (N, S), plan, metrics): the chains with their trained steps' child pairs."""
        cfg, grid, seed = self.cfg, feed.grid, feed.cfg.train.seed
        device = models.device
        trained = trained_chain_steps(grid.steps, cfg.trained_steps)
        trained = trained[grid.stochastic(cfg.eta)[trained]]  # a deterministic last step has no log-prob: never trained
        extra = torch.stack([torch.randn((len(trained), cfg.children - 1, *init.shape[1:]),
                                         generator=item_generator(seed, r, s, p, "tailorpo_children")) for s, p in zip(slots, prompt_ids)])
        alphas = grid.alphas_cumprod.to(device)
        cond_d, uncond_d = cond.to(device, torch.float32), uncond.to(device, torch.float32)
        x = init.to(device)
        latents, log_probs, winners, losers, gaps, kept_rewards, pushed = [x.cpu()], [], [], [], [], [], []
        for k in range(grid.steps):
            t, t_prev = grid.timesteps[k], grid.prev_timesteps[k]
            eps = guided_prediction(models.policy, x, t.reshape(1), cond_d, uncond_d, cfg.cfg_scale)
            if k in trained:
                j = int((trained == k).nonzero())
                zs = [noise[:, k]] + [extra[:, j, c] for c in range(cfg.children - 1)]
                kids = [ddim_step_with_logprob(eps, x, t, t_prev, alphas, grid.prediction_type, cfg.eta, noise=z.to(device),
                                               final_alpha_cumprod=grid.final_alpha_cumprod) for z in zs]
                rewards = torch.stack([self._reward(feed, models, c, t_prev, cond_d, uncond_d, prompts) for c, _ in kids], 1)
                best, worst = rewards.argmax(1), rewards.argmin(1)
                children = torch.stack([c for c, _ in kids], 1)  # (N, K, C, h, w)
                rows = torch.arange(len(x), device=device)
                w, l_ = children[rows, best], children[rows, worst]
                r_w = rewards[rows, best]
                if cfg.guidance:
                    w, r_w, moved = self._push(feed, models, w, t_prev, cond_d, uncond_d, prompts, k, r_w)
                    pushed.append(moved.float().mean())
                winners.append(w.cpu())
                losers.append(l_.cpu())
                gaps.append((r_w - rewards[rows, worst]).cpu())
                kept_rewards.append(r_w.cpu())
                if cfg.continuation == "winner":
                    x = w
                else:
                    pick = torch.stack([torch.randint(cfg.children, (1,), generator=item_generator(seed, r * 1000 + k, s, p, "tailorpo_continuation"))
                                        for s, p in zip(slots, prompt_ids)]).flatten().to(device)
                    x = children[rows, pick]
                _, logp = ddim_step_with_logprob(eps, latents[-1].to(device), t, t_prev, alphas, grid.prediction_type, cfg.eta,
                                                 prev_sample=x, final_alpha_cumprod=grid.final_alpha_cumprod)
            elif cfg.untrained_steps == "deterministic" or not bool(grid.stochastic(cfg.eta)[k]):
                x, logp = ddim_step(eps, x, t, t_prev, alphas, grid.prediction_type, grid.final_alpha_cumprod), torch.zeros(len(x))
            else:
                x, logp = ddim_step_with_logprob(eps, x, t, t_prev, alphas, grid.prediction_type, cfg.eta, noise=noise[:, k].to(device),
                                                 final_alpha_cumprod=grid.final_alpha_cumprod)
            latents.append(x.cpu())
            log_probs.append(logp.cpu())
        gap = torch.stack(gaps, 1)
        plan = {"trained": trained.expand(len(x), -1).clone(), "winners": torch.stack(winners, 1), "losers": torch.stack(losers, 1),
                "keep": (gap > cfg.threshold) if cfg.threshold > 0 else torch.ones_like(gap, dtype=torch.bool)}
        final = self._reward(feed, models, x, torch.tensor(-1), cond_d, uncond_d, prompts)
        metrics = {"reward": final.mean().cpu(), "reward_gap": gap.mean(), "step_reward": torch.stack(kept_rewards).mean()}
        if pushed:
            metrics["pushed"] = torch.stack(pushed).mean().cpu()
        return torch.stack(latents, 1), torch.stack(log_probs, 1), plan, metrics

    # ------------------------------------------------------------------------------------------ training

    def batches(self, rd, in_round: int, step: int, train) -> list[list[ChildPairs]]:
        """Per micro-batch of this step's trajectories, one batch of child pairs per trained step."""
        b, accum, plan = train.batch_size, train.grad_accum, rd.plan
        start = in_round * b * accum
        out = []
        for a in range(accum):
            rows = torch.arange(start + a * b, start + (a + 1) * b)
            out.append([ChildPairs(rd.traj, rows, plan["trained"][rows, j], plan["winners"][rows, j], plan["losers"][rows, j],
                                   plan["keep"][rows, j]) for j in range(plan["trained"].shape[1])])
        return out

    def _log_probs(self, models, batch: ChildPairs, reference: bool) -> torch.Tensor:
        """(B, 2): log π(x^w | x_k), log π(x^l | x_k) from ONE guided forward at the parent."""
        traj, cfg = batch.traj, self.cfg
        g = traj.grid
        x = traj.latents[batch.rows, batch.steps].to(models.device).float()
        t, t_prev = g.timesteps[batch.steps], g.prev_timesteps[batch.steps]
        net = models.reference if reference else models.policy
        eps = guided_prediction(net, x, t, traj.cond.select(batch.rows), traj.uncond.select(batch.rows), traj.guidance)
        alphas = g.alphas_cumprod.to(x.device)
        return torch.stack([ddim_step_with_logprob(eps, x, t, t_prev, alphas, g.prediction_type, cfg.eta, prev_sample=c.to(x.device).float(),
                                                   final_alpha_cumprod=g.final_alpha_cumprod)[1] for c in (batch.winners, batch.losers)], 1)

    def loss(self, models, batch: ChildPairs, draws):
        cfg = self.cfg
        logp = self._log_probs(models, batch, reference=False)
        ref = self._log_probs(models, batch, reference=True).to(logp)
        log_ratio = logp - ref  # (B, 2)
        if cfg.ratio_clamp is not None:
            log_ratio = torch.log(torch.exp(log_ratio).clamp(1 - cfg.ratio_clamp, 1 + cfg.ratio_clamp))
        z = cfg.beta * (log_ratio[:, 0] - log_ratio[:, 1])
        per = pairwise_loss(z, **cfg.pairwise_options())
        keep = batch.keep.to(per.device).float()
        loss = (per * keep).sum() / keep.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "logit": z.detach().mean(), "kept": keep.mean()}
