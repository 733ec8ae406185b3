"""Rollouts for online methods: trajectories sampled from the policy with classifier-free guidance, each DDIM step
stored with its log-probability so the loss can recompute it under the updated policy.

Notation (DDPO / DanceGRPO on SD models; `diffalign.diffusion.ddim_step_with_logprob`):

    S            sampling steps; grid t_0 > t_1 > ... > t_{S-1} of diffusers' DDIMScheduler for the model's own
                 scheduler config (the grid `diffalign generate --scheduler ddim` and the toy bench sample on)
    x_k          latents before step k (x_0 = the initial noise x_T, x_S = the final latents)
    ε̂_k          CFG prediction ε_u + w·(ε_c − ε_u), both branches from the policy in one batched forward
    π(x_{k+1}|x_k)  N(μ_k, σ_k²·I), DDIM with η (1: DDPM-like, as DDPO and DanceGRPO), log-prob a MEAN over dims

Every random number is counter-based (`diffalign.randomness`): image j of a round's global batch (its `slot`) with
prompt index `prompt_id` draws its initial noise under stream ``rollout_init`` and all of its step noises under
``rollout_noise``; with ``same_noise`` the G images of a group share the initial noise of the group (Pref-GRPO's
``--init_same_noise``, DanceGRPO's shared initial latent), keyed by the group's first slot. A resumed or re-sharded
run therefore draws the same rollouts from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.diffusion import ddim_mean_std, ddim_sigma, ddim_step, ddim_step_with_logprob
from diffalign.randomness import item_generator
from diffalign.trainers.batch import Cond


@dataclass(frozen=True)
class SamplingGrid:
    """The DDIM grid of a rollout: step k goes from `timesteps[k]` to `prev_timesteps[k]` (−1: past the last one)."""

    timesteps: torch.Tensor  # (S,) long, decreasing
    prev_timesteps: torch.Tensor  # (S,) long
    alphas_cumprod: torch.Tensor  # (T,) float32
    final_alpha_cumprod: float  # ᾱ after the last step (diffusers' set_alpha_to_one)
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler, steps: int) -> "SamplingGrid":
        """The grid of diffusers' DDIMScheduler built from `scheduler`'s config (its spacing and steps_offset)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(steps)
        t = ddim.timesteps.long()
        prev = t - ddim.config.num_train_timesteps // steps
        return cls(t, prev, ddim.alphas_cumprod.float(), float(ddim.final_alpha_cumprod), ddim.config.prediction_type)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def stochastic(self, eta: float) -> torch.Tensor:
        """(S,) bool: the steps with σ_k > 0, which have a log-prob. With ``set_alpha_to_one`` (ᾱ = 1 after the last
        step, diffusers' default) the last step is deterministic for every η: it runs as plain DDIM and is never
        trained."""
        return ddim_sigma(self.timesteps, self.prev_timesteps, self.alphas_cumprod, eta, self.final_alpha_cumprod) > 0


@dataclass
class Trajectories:
    """N trajectories of S steps; row i sits at `slots[i]` of its round (image slot % G of group slot // G)."""

    prompts: list[str]
    prompt_ids: torch.Tensor  # (N,) long: index of the prompt in the run's prompt list
    slots: torch.Tensor  # (N,) long: the image's place in the round's global batch
    cond: Cond  # conditional branch, (N, ...)
    uncond: Cond  # unconditional branch, (N, ...)
    latents: torch.Tensor  # (N, S + 1, C, h, w): x_0 = initial noise ... x_S = final latents
    log_probs: torch.Tensor  # (N, S): log π_old(x_{k+1} | x_k), mean over dims
    grid: SamplingGrid
    guidance: float
    eta: float

    def __len__(self) -> int:
        return len(self.prompts)


def rollout_noise(seed: int, step: int, slots: list[int], prompt_ids: list[int], group_size: int, steps: int,
                  shape: tuple[int, ...], same_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise (N, C, h, w), step noises (N, S, C, h, w)) for the images at `slots`, counter-based."""
    init, per_step = [], []
    for slot, pid in zip(slots, prompt_ids):
        key_slot = (slot // group_size) * group_size if same_noise else slot  # a group's first slot
        init.append(torch.randn(shape, generator=item_generator(seed, step, key_slot, pid, "rollout_init")))
        per_step.append(torch.randn((steps, *shape), generator=item_generator(seed, step, slot, pid, "rollout_noise")))
    return torch.stack(init), torch.stack(per_step)


def guided_prediction(net, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, guidance: float,
                      detach_uncond: bool = False) -> torch.Tensor:
    """ε̂ = ε_u + w·(ε_c − ε_u) from ONE forward of `net` (`Models.policy` or `Models.reference`) over [uncond; cond];
    w = 1: the conditional branch alone. `t` is (1,) or (N,). `detach_uncond`: no gradient through the unconditional
    branch (Flow-GRPO's choice)."""
    n = x.shape[0]
    t = t.expand(n) if t.numel() == 1 else t
    if guidance == 1.0:
        return net(x, t, cond).float()
    both = Cond(*(None if u is None else torch.cat([u, c]) for u, c in
                  ((uncond.prompt_embeds, cond.prompt_embeds), (uncond.pooled, cond.pooled), (uncond.time_ids, cond.time_ids))))
    out = net(torch.cat([x, x]), torch.cat([t, t]), both).float()
    e_u, e_c = out[:n], out[n:]
    if detach_uncond:
        e_u = e_u.detach()
    return e_u + guidance * (e_c - e_u)


def transition(models, traj: Trajectories, rows: torch.Tensor, k: torch.Tensor, *, reference: bool = False,
               detach_uncond: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(x_{k+1} | x_k), μ, σ) of the stored transitions of `rows`, each at its own step `k` (B,), under the
    current policy (with gradients) or the reference (``reference=True``, without)."""
    g = traj.grid
    k = k.reshape(-1).expand(len(rows)) if k.numel() == 1 else k
    x = traj.latents[rows, k].to(models.device).float()
    t, t_prev = g.timesteps[k], g.prev_timesteps[k]
    net = models.reference if reference else models.policy
    eps = guided_prediction(net, x, t, traj.cond.select(rows), traj.uncond.select(rows), traj.guidance, detach_uncond)
    alphas = g.alphas_cumprod.to(x.device)
    mean, sigma = ddim_mean_std(eps, x, t, t_prev, alphas, g.prediction_type, traj.eta, g.final_alpha_cumprod)
    _, logp = ddim_step_with_logprob(eps, x, t, t_prev, alphas, g.prediction_type, traj.eta,
                                     prev_sample=traj.latents[rows, k + 1].to(x.device).float(), final_alpha_cumprod=g.final_alpha_cumprod)
    return logp, mean, sigma


def step_log_prob(models, traj: Trajectories, rows: torch.Tensor, k, detach_uncond: bool = False) -> torch.Tensor:
    """log π_θ(x_{k+1} | x_k) of the stored transitions of `rows` at step(s) `k` under the CURRENT policy (with gradients)."""
    return transition(models, traj, rows, torch.as_tensor(k).long(), detach_uncond=detach_uncond)[0]


@torch.no_grad()
def sample_trajectories(models, cond: Cond, uncond: Cond, init_noise: torch.Tensor, step_noise: torch.Tensor,
                        grid: SamplingGrid, guidance: float, eta: float, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, S + 1, C, h, w), log-probs (N, S)) of N trajectories from `init_noise` with the given step noises;
    latents in float32 on the CPU. A deterministic step (`SamplingGrid.stochastic`) is a plain DDIM step, log-prob 0.
    `reference`: sampled from the reference model (the base) instead of the policy."""
    net = models.reference if reference else models.policy
    x = init_noise.to(models.device, torch.float32)
    latents, log_probs = [x.cpu()], []
    alphas = grid.alphas_cumprod.to(models.device)
    stochastic = grid.stochastic(eta)
    for k in range(grid.steps):
        eps = guided_prediction(net, x, grid.timesteps[k].reshape(1), cond, uncond, guidance)
        t, t_prev = grid.timesteps[k], grid.prev_timesteps[k]
        if stochastic[k]:
            x, logp = ddim_step_with_logprob(eps, x, t, t_prev, alphas, grid.prediction_type, eta, noise=step_noise[:, k],
                                             final_alpha_cumprod=grid.final_alpha_cumprod)
        else:
            x, logp = ddim_step(eps, x, t, t_prev, alphas, grid.prediction_type, grid.final_alpha_cumprod), torch.zeros(len(x))
        latents.append(x.cpu())
        log_probs.append(logp.cpu())
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float, batch_size: int = 16) -> torch.Tensor:
    """Images in [0, 1] (N, 3, H, W), float32 on the CPU, from final latents (N, C, h, w)."""
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i : i + batch_size].to(vae.device, vae.dtype) / scaling_factor
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)
