"""From a collated `LatentPairDataset` batch to a `LatentBatch`: all K images of each item, their shared draws
and their real preference signal.

Pairing invariants (research/dpo_anchors.md §1.1, §7): all images of an item share the timestep t, the noise
ε and the caption-dropout decision; each image keeps its own SDXL time ids and its own posterior sample. Every
draw comes from `Draws` (counter-based: seed, step, slot in the step's global batch, item id, stream). The
posterior noise is one (K, C, h, w) draw per item, whatever the method uses of it, so a pairwise method and a
K-image method see the same latents for the same item. When the cache holds both orientations of every image
(``data.flip_at = 'train'``), each access also draws which one each image trains in (`draw_flips`): one draw per
item under ``data.pairing = 'shared'``, one per image under ``'per_image'`` (the official per-access flip); the
time ids stay those of the crop.

Images are chosen per item by an index tensor `images` of shape (B, n) (slot numbers 0..K-1); everything a
method runs the UNet on is laid out image-major: row j·B + b is image `images[b, j]` of item b, so the errors
reshape to (B, n) with `per_image`. A pairwise method passes `batch.pair().images` ((B, 2): winner, loser),
which gives the [winners; losers] layout of one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.diffusion import sample_posterior
from diffalign.randomness import Draws


@dataclass
class Cond:
    """Text conditioning of N UNet rows: prompt embeddings and, for SDXL, pooled embeddings and time ids."""

    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor | None = None  # (N, D2)
    time_ids: torch.Tensor | None = None  # (N, 6)

    def to(self, device, dtype) -> "Cond":
        move = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
        return Cond(move(self.prompt_embeds), move(self.pooled), move(self.time_ids))

    def select(self, rows: torch.Tensor) -> "Cond":
        """The conditioning of the given rows only."""
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        return Cond(pick(self.prompt_embeds), pick(self.pooled), pick(self.time_ids))

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw


@dataclass
class Pair:
    """The pair a pairwise method trains on (decided by `diffalign.data.pairing`, carried by the dataset)."""

    winner: torch.Tensor  # (B,) slot of the preferred image
    loser: torch.Tensor  # (B,)
    label: torch.Tensor  # (B,) P(winner preferred): 1 for a hard pair, soft labels kept, 0.5 for a kept tie

    @property
    def images(self) -> torch.Tensor:
        """(B, 2): winner and loser slots, for `LatentBatch.x0` / `cond`."""
        return torch.stack([self.winner, self.loser], dim=1)


@dataclass
class LatentBatch:
    """B items of K cached images each, with one t, ε and caption-dropout decision per item."""

    item_id: torch.Tensor  # (B,)
    mean: torch.Tensor  # (B, K, C, h, w) unscaled VAE posterior mean
    logvar: torch.Tensor  # (B, K, C, h, w)
    posterior_noise: torch.Tensor  # (B, K, C, h, w): one draw per item
    scaling_factor: float
    t: torch.Tensor  # (B,) long, shared by the item's images
    noise: torch.Tensor  # (B, C, h, w): ε, shared by the item's images
    dropped: torch.Tensor  # (B,) bool: caption replaced by the empty caption
    prompt_embeds: torch.Tensor  # (B, L, D), after dropout
    pooled: torch.Tensor | None  # (B, D2), after dropout (SDXL)
    time_ids: torch.Tensor | None  # (B, K, 6): each image its own (SDXL)
    label: torch.Tensor  # (B,) the item's own label, P(images[0] preferred); NaN when none
    ranks: torch.Tensor  # (B, K) 0 = best
    scores: torch.Tensor  # (B, K) per-image preference scores (φ for synthetic data); NaN when none
    extra_scores: dict[str, torch.Tensor]  # scorer -> (B, K) raw scores
    pair_slots: torch.Tensor  # (B, 2) winner, loser
    pair_label: torch.Tensor  # (B,)
    flipped: torch.Tensor | None = None  # (B, K) bool: image trained mirrored at this access (data.flip_at = 'train')
    empty_prompt_embeds: torch.Tensor | None = None  # (L, D): the "" caption, as caption dropout uses it
    empty_pooled: torch.Tensor | None = None  # (D2,) (SDXL)

    @property
    def size(self) -> int:
        return len(self.item_id)

    @property
    def k(self) -> int:
        return self.mean.shape[1]

    def pair(self) -> Pair:
        return Pair(self.pair_slots[:, 0], self.pair_slots[:, 1], self.pair_label)

    def all_images(self) -> torch.Tensor:
        """(B, K): every image of every item."""
        return torch.arange(self.k).expand(self.size, self.k)

    def x0(self, images: torch.Tensor) -> torch.Tensor:
        """(n·B, C, h, w): a fresh posterior sample of each chosen image, times the VAE scaling factor (image-major)."""
        rows = torch.arange(self.size)
        out = []
        for which in images.T:
            z = sample_posterior(self.mean[rows, which], self.logvar[rows, which], self.posterior_noise[rows, which])
            out.append(z * self.scaling_factor)
        return torch.cat(out)

    def cond(self, images: torch.Tensor) -> Cond:
        """The conditioning of the chosen images' rows (image-major), each image with its own time ids."""
        n, rows = images.shape[1], torch.arange(self.size)
        if self.pooled is None:
            return Cond(self.prompt_embeds.repeat(n, 1, 1))
        time_ids = torch.cat([self.time_ids[rows, which] for which in images.T])
        return Cond(self.prompt_embeds.repeat(n, 1, 1), self.pooled.repeat(n, 1), time_ids)

    def unconditional(self, images: torch.Tensor, zeros: bool = False) -> Cond:
        """The conditioning of the chosen images' rows with the caption left out: the encoded "" caption (what caption
        dropout trains), or zero embeddings (``zeros``: SDXL's ``force_zeros_for_empty_prompt``); time ids kept."""
        rows = images.numel()
        embeds = self.empty_prompt_embeds.expand(rows, *self.empty_prompt_embeds.shape).clone()
        if zeros:
            embeds = torch.zeros_like(embeds)
        if self.pooled is None:
            return Cond(embeds)
        pooled = torch.zeros(rows, *self.empty_pooled.shape) if zeros else self.empty_pooled.expand(rows, -1).clone()
        return Cond(embeds, pooled, self.cond(images).time_ids)

    def timesteps(self, n: int) -> torch.Tensor:
        """(n·B,): the item's shared t for each of n chosen images."""
        return self.t.repeat(n)

    def shared_noise(self, n: int) -> torch.Tensor:
        """(n·B, C, h, w): the item's shared ε for each of n chosen images."""
        return self.noise.repeat(n, 1, 1, 1)


def per_image(values: torch.Tensor, n: int) -> torch.Tensor:
    """(n·B,) image-major -> (B, n)."""
    return values.view(n, -1).T


@dataclass
class BatchRules:
    """What the loop knows when it builds a batch: schedule length, latent scale, empty caption, dropout."""

    num_train_timesteps: int
    scaling_factor: float
    empty_prompt_embeds: torch.Tensor
    empty_pooled: torch.Tensor | None
    caption_dropout: float


def draw_flips(raw: dict, draws: Draws) -> torch.Tensor | None:
    """(B, K) bool: which images train mirrored at this access; None when the cache holds one orientation.

    Each item draws K uniforms from its "flip" stream; image j is mirrored when the uniform of its flip group
    (``raw["flip_group"][b, j]``: 0 for all images under pairing 'shared', j under 'per_image') is below 1/2."""
    if "mean_mirrored" not in raw:
        return None
    k = raw["mean"].shape[1]
    u = torch.stack(draws.per_item("flip", lambda g: torch.rand(k, generator=g)))
    return torch.gather(u, 1, raw["flip_group"]) < 0.5


def oriented(raw: dict, key: str, flipped: torch.Tensor | None) -> torch.Tensor:
    """`raw[key]` (B, K, C, h, w) with the mirrored images taken from `raw[key + "_mirrored"]`."""
    if flipped is None:
        return raw[key]
    return torch.where(flipped[:, :, None, None, None], raw[key + "_mirrored"], raw[key])


def build_batch(raw: dict, rules: BatchRules, draws: Draws) -> LatentBatch:
    """Draw each item's posterior noise, t, ε, caption dropout and (with both orientations cached) flips, keyed by
    `draws`, and apply them."""
    image_shape = raw["mean"].shape[1:]  # (K, C, h, w)
    posterior_noise = torch.stack(draws.per_item("latent", lambda g: torch.randn(image_shape, generator=g)))
    t = torch.cat(draws.per_item("timestep", lambda g: torch.randint(0, rules.num_train_timesteps, (1,), generator=g)))
    noise = torch.stack(draws.per_item("noise", lambda g: torch.randn(image_shape[1:], generator=g)))
    dropped = torch.tensor([bool(r < rules.caption_dropout) for r in draws.per_item("caption_dropout", lambda g: torch.rand(1, generator=g))])
    prompt = torch.where(dropped[:, None, None], rules.empty_prompt_embeds, raw["prompt_embeds"])
    pooled = torch.where(dropped[:, None], rules.empty_pooled, raw["pooled"]) if "pooled" in raw else None
    flipped = draw_flips(raw, draws)
    mean, logvar = oriented(raw, "mean", flipped), oriented(raw, "logvar", flipped)
    return LatentBatch(
        item_id=raw["item_id"], mean=mean, logvar=logvar, posterior_noise=posterior_noise,
        scaling_factor=rules.scaling_factor, t=t, noise=noise, dropped=dropped, prompt_embeds=prompt, pooled=pooled,
        time_ids=raw["time_ids"] if pooled is not None else None, label=raw["label"], ranks=raw["ranks"], scores=raw["scores"],
        extra_scores=dict(raw.get("extra_scores", {})), pair_slots=raw["pair"], pair_label=raw["pair_label"], flipped=flipped,
        empty_prompt_embeds=rules.empty_prompt_embeds, empty_pooled=rules.empty_pooled,
    )
