"""From a collated `LatentPairDataset` batch to one batched UNet input for all images of the step.

Pairing invariants (research/dpo_anchors.md §1.1, §7): winner and loser share the timestep t, the
noise ε and caption dropout; each image keeps its own SDXL time ids. Every draw comes from
`item_generator(seed, step, slot, item_id, stream)`, with `slots` the items' positions in the
optimizer step's global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.diffusion import add_noise, sample_posterior, training_target
from diffalign.trainers.randomness import item_generator


@dataclass
class UNetInputs:
    noisy: torch.Tensor  # (N, C, h, w), N = B (winners) or 2B (winners then losers)
    timesteps: torch.Tensor  # (N,)
    target: torch.Tensor  # (N, C, h, w)
    encoder_hidden_states: torch.Tensor  # (N, L, D)
    added_cond: dict[str, torch.Tensor] | None  # SDXL: text_embeds (N, D2), time_ids (N, 6)
    label: torch.Tensor  # (B,) P(winner preferred): 1, or 0.5 for a tie

    def unet_kwargs(self) -> dict:
        kw = dict(sample=self.noisy, timestep=self.timesteps, encoder_hidden_states=self.encoder_hidden_states)
        if self.added_cond is not None:
            kw["added_cond_kwargs"] = self.added_cond
        return kw


def winner_loser(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K) ranks (0 = best) -> winner index, loser index (best and worst), label (0.5 if they tie)."""
    order = torch.argsort(ranks, dim=1, stable=True)
    w, l = order[:, 0], order[:, -1]
    tie = ranks.gather(1, w[:, None]) == ranks.gather(1, l[:, None])
    return w, l, torch.where(tie[:, 0], 0.5, 1.0)


@dataclass
class Conditioning:
    """What the loop knows about the model: schedule, latent scale, target type, empty caption."""

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    scaling_factor: float
    prediction_type: str
    empty_prompt_embeds: torch.Tensor
    empty_pooled: torch.Tensor | None
    caption_dropout: float
    seed: int


def build_inputs(batch: dict, cond: Conditioning, step: int, slots: list[int], uses_loser: bool, device, dtype) -> UNetInputs:
    ids = batch["item_id"].tolist()
    w_idx, l_idx, label = winner_loser(batch["ranks"])
    pick = [w_idx, l_idx] if uses_loser else [w_idx]
    rows = torch.arange(len(ids))

    def draw(stream: str, fn):
        return [fn(item_generator(cond.seed, step, slot, i, stream)) for slot, i in zip(slots, ids)]

    image_shape = batch["mean"].shape[1:]  # (K, C, h, w)
    posterior_noise = torch.stack(draw("latent", lambda g: torch.randn(image_shape, generator=g)))  # (B, K, C, h, w)
    x0, time_ids = [], []
    for which in pick:
        z = sample_posterior(batch["mean"][rows, which], batch["logvar"][rows, which], posterior_noise[rows, which])
        x0.append(z * cond.scaling_factor)  # (B, C, h, w)
        if "time_ids" in batch:
            time_ids.append(batch["time_ids"][rows, which])  # (B, 6): each image its own
    # one t, one ε and one dropout decision per item, shared by its winner and loser
    shared_t = torch.cat(draw("timestep", lambda g: torch.randint(0, cond.num_train_timesteps, (1,), generator=g)))
    shared_eps = torch.stack(draw("noise", lambda g: torch.randn(image_shape[1:], generator=g)))
    drop = torch.tensor([bool(r < cond.caption_dropout) for r in draw("caption_dropout", lambda g: torch.rand(1, generator=g))])

    prompt = torch.where(drop[:, None, None], cond.empty_prompt_embeds, batch["prompt_embeds"])
    x0 = torch.cat(x0)  # (N, C, h, w), winners first
    t = shared_t.repeat(len(pick))
    noise = shared_eps.repeat(len(pick), 1, 1, 1)
    noisy = add_noise(x0, noise, t, cond.alphas_cumprod)
    target = training_target(x0, noise, t, cond.alphas_cumprod, cond.prediction_type)
    added = None
    if "pooled" in batch:
        text_embeds = torch.where(drop[:, None], cond.empty_pooled, batch["pooled"])
        added = {"text_embeds": text_embeds.repeat(len(pick), 1).to(device, dtype), "time_ids": torch.cat(time_ids).to(device, dtype)}
    return UNetInputs(
        noisy=noisy.to(device, dtype),
        timesteps=t.to(device),
        target=target.to(device),
        encoder_hidden_states=prompt.repeat(len(pick), 1, 1).to(device, dtype),
        added_cond=added,
        label=label.to(device),
    )
