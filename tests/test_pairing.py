"""Pairing invariants of the training batch: shared t, ε and caption dropout; own time ids; counter RNG;
the one pairing rule (labels kept soft, ties by score); K images of an item in one batched forward."""

import numpy as np
import torch
from torch.testing import assert_close

from diffalign.data.pairing import dense_ranks, item_ranks, trained_pairs
from diffalign.randomness import Draws
from diffalign.trainers.batch import BatchRules, build_batch, per_image
from diffalign.trainers.sampler import GlobalBatchSampler


def _raw(ids, K=2, sdxl=True):
    g = torch.Generator().manual_seed(0)
    B = len(ids)
    time_ids = torch.tensor([[40.0, 50, 1, 2, 32, 32], [60.0, 70, 3, 4, 32, 32], [80, 90, 5, 6, 32, 32], [1, 2, 3, 4, 32, 32]][:K])
    b = {
        "item_id": torch.tensor(ids),
        "mean": torch.randn(B, K, 4, 8, 8, generator=g),
        "logvar": torch.full((B, K, 4, 8, 8), -4.0),
        "prompt_embeds": torch.randn(B, 77, 64, generator=g),
        "label": torch.ones(B) if K == 2 else torch.full((B,), float("nan")),
        "ranks": torch.arange(K).repeat(B, 1),
        "scores": torch.full((B, K), float("nan")),
        "pair": torch.tensor([[0, K - 1]] * B),
        "pair_label": torch.ones(B),
        "time_ids": time_ids.repeat(B, 1, 1),
    }
    if sdxl:
        b["pooled"] = torch.randn(B, 32, generator=g)
    return b


def _rules(dropout=0.0):
    return BatchRules(num_train_timesteps=1000, scaling_factor=0.13, empty_prompt_embeds=torch.zeros(77, 64), empty_pooled=torch.zeros(32),
                      caption_dropout=dropout)


def _batch(ids, step=4, slots=None, dropout=0.0, K=2, sdxl=True):
    raw = _raw(ids, K, sdxl)
    return build_batch(raw, _rules(dropout), Draws(7, step, slots or range(len(ids)), ids))


def test_winner_and_loser_share_t_noise_and_caption():
    b = _batch([3, 9, 12], dropout=0.5)
    images = b.pair().images
    x0, cond = b.x0(images), b.cond(images)
    B = 3
    assert_close(b.timesteps(2)[:B], b.timesteps(2)[B:])
    assert_close(b.shared_noise(2)[:B], b.shared_noise(2)[B:])
    assert_close(cond.prompt_embeds[:B], cond.prompt_embeds[B:])
    assert_close(cond.pooled[:B], cond.pooled[B:])
    # each image keeps its own true SDXL time ids and its own latent
    assert cond.time_ids[0].tolist() == [40, 50, 1, 2, 32, 32]
    assert cond.time_ids[B].tolist() == [60, 70, 3, 4, 32, 32]
    assert not torch.equal(x0[:B], x0[B:])


def test_caption_dropout_is_shared_and_hits_the_expected_fraction():
    b = _batch(list(range(400)), step=0, dropout=0.3)
    cond = b.cond(b.pair().images)
    dropped_w = cond.prompt_embeds[:400].abs().sum(dim=(1, 2)) == 0
    dropped_l = cond.prompt_embeds[400:].abs().sum(dim=(1, 2)) == 0
    assert torch.equal(dropped_w, dropped_l) and torch.equal(dropped_w, b.dropped)
    assert torch.equal(dropped_w, cond.pooled[:400].abs().sum(1) == 0)
    assert 0.22 < dropped_w.float().mean().item() < 0.38


def test_draws_depend_on_step_slot_and_item_not_on_how_the_batch_is_split():
    """Item 9 at slot 1 gets the same t, noise and latent in a micro-batch of 2 or alone (2 processes, or accumulation)."""
    full = _batch([3, 9], step=5, slots=[0, 1])
    raw = {k: v[1:] for k, v in _raw([3, 9]).items()}
    alone = build_batch(raw, _rules(), Draws(7, 5, [1], [9]))
    assert_close(full.t[1], alone.t[0])
    assert_close(full.noise[1], alone.noise[0])
    assert_close(full.x0(full.all_images())[[1, 3]], alone.x0(alone.all_images()))
    assert not torch.equal(_batch([3, 9], step=6, slots=[0, 1]).noise, full.noise)
    assert not torch.equal(_batch([3, 9], step=5, slots=[2, 3]).noise, full.noise)  # an item seen twice in a step


def test_k_images_come_image_major_and_reshape_per_item():
    b = _batch([3, 9], K=4)
    images = b.all_images()
    x0 = b.x0(images)  # (4·2, C, h, w): row j·B + i is image j of item i
    assert x0.shape == (8, 4, 8, 8)
    expected = (b.mean + torch.exp(0.5 * b.logvar) * b.posterior_noise) * b.scaling_factor
    assert_close(x0[1 * 2 + 1], expected[1, 1])
    assert_close(b.cond(images).time_ids[2 * 2 + 0], b.time_ids[0, 2])
    assert per_image(torch.arange(8.0), 4).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # a pair draws from the same per-item latent noise as all K images: the pairwise and the K-image views agree
    pair = b.pair().images
    assert_close(b.x0(pair)[2:], x0[3 * 2:])


def test_the_pairing_rule():
    nan = float("nan")
    label = np.array([1.0, 0.0, 0.7, 0.3, 0.5, nan, nan, nan])
    ranks = item_ranks(label, np.array([[-1, -1]] * 5 + [[-1, -1], [1, 0], [-1, -1]]),
                       np.array([[nan, nan]] * 5 + [[0.2, 0.9], [nan, nan], [0.4, 0.4]]))
    assert ranks.tolist() == [[0, 1], [1, 0], [0, 1], [1, 0], [0, 0], [1, 0], [1, 0], [0, 0]]
    winner, loser, p = trained_pairs(label, ranks)
    assert winner.tolist() == [0, 1, 0, 1, 0, 1, 1, 0] and loser.tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    assert p.tolist() == np.array([1, 1, 0.7, 0.7, 0.5, 1, 1, 0.5], dtype=np.float32).tolist()  # soft labels kept; score tie = 0.5
    # lists: best against worst, the first of equals, ½ when every image ties
    winner, loser, p = trained_pairs(np.full(3, nan), np.array([[2, 0, 1], [0, 1, 0], [1, 1, 1]]))
    assert (winner.tolist(), loser.tolist(), p.tolist()) == ([1, 0, 0], [0, 1, 2], [1.0, 1.0, 0.5])
    assert dense_ranks(np.array([0.9, 0.2, 0.9])).tolist() == [0, 1, 0]
    assert dense_ranks(np.array([nan, 0.5, 0.9])).tolist() == [2, 1, 0]  # a missing score ranks last


def test_sampler_two_processes_cover_the_single_process_global_batch():
    one = iter(GlobalBatchSampler(10, 4, seed=3, num_processes=1, rank=0))
    r0 = iter(GlobalBatchSampler(10, 2, seed=3, num_processes=2, rank=0))
    r1 = iter(GlobalBatchSampler(10, 2, seed=3, num_processes=2, rank=1))
    for _ in range(7):  # crosses epoch boundaries
        assert [next(one) for _ in range(4)] == [next(r0), next(r0), next(r1), next(r1)]


def test_sampler_resume_position_is_exact():
    full = iter(GlobalBatchSampler(7, 3, seed=1))
    seq = [next(full) for _ in range(3 * 9)]
    resumed = iter(GlobalBatchSampler(7, 3, seed=1, start_micro_batch=5))
    assert [next(resumed) for _ in range(3 * 4)] == seq[15:]
    assert sorted(seq[:7]) == list(range(7))  # each epoch is a permutation
