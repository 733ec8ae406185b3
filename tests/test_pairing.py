"""Pairing invariants of the training batch: shared t, ε and caption dropout; own time ids; counter RNG."""

import torch
from torch.testing import assert_close

from diffalign.trainers.batch import Conditioning, build_inputs, winner_loser
from diffalign.trainers.sampler import GlobalBatchSampler


def _batch(ids, K=2, sdxl=True):
    g = torch.Generator().manual_seed(0)
    B = len(ids)
    b = {
        "item_id": torch.tensor(ids),
        "mean": torch.randn(B, K, 4, 8, 8, generator=g),
        "logvar": torch.full((B, K, 4, 8, 8), -4.0),
        "prompt_embeds": torch.randn(B, 77, 64, generator=g),
        "ranks": torch.tensor([[0, 1]] * B),
        "label": torch.ones(B),
        "time_ids": torch.tensor([[[40.0, 50, 1, 2, 32, 32], [60.0, 70, 3, 4, 32, 32]]] * B),
    }
    if sdxl:
        b["pooled"] = torch.randn(B, 32, generator=g)
    return b


def _cond(dropout=0.0):
    return Conditioning(
        alphas_cumprod=torch.linspace(0.999, 0.01, 1000),
        num_train_timesteps=1000,
        scaling_factor=0.13,
        prediction_type="epsilon",
        empty_prompt_embeds=torch.zeros(77, 64),
        empty_pooled=torch.zeros(32),
        caption_dropout=dropout,
        seed=7,
    )


def test_winner_and_loser_share_t_noise_and_caption():
    b = _batch([3, 9, 12])
    x = build_inputs(b, _cond(0.5), step=4, slots=[0, 1, 2], uses_loser=True, device="cpu", dtype=torch.float32)
    B = 3
    assert_close(x.timesteps[:B], x.timesteps[B:])
    assert_close(x.target[:B], x.target[B:])  # ε-target = the shared noise
    assert_close(x.encoder_hidden_states[:B], x.encoder_hidden_states[B:])
    assert_close(x.added_cond["text_embeds"][:B], x.added_cond["text_embeds"][B:])
    # each image keeps its own true SDXL time ids
    assert x.added_cond["time_ids"][0].tolist() == [40, 50, 1, 2, 32, 32]
    assert x.added_cond["time_ids"][B].tolist() == [60, 70, 3, 4, 32, 32]
    assert not torch.equal(x.noisy[:B], x.noisy[B:])


def test_caption_dropout_is_shared_and_hits_the_expected_fraction():
    b = _batch(list(range(400)), sdxl=True)
    x = build_inputs(b, _cond(0.3), step=0, slots=list(range(400)), uses_loser=True, device="cpu", dtype=torch.float32)
    dropped_w = (x.encoder_hidden_states[:400].abs().sum(dim=(1, 2)) == 0)
    dropped_l = (x.encoder_hidden_states[400:].abs().sum(dim=(1, 2)) == 0)
    assert torch.equal(dropped_w, dropped_l)
    pooled_dropped = x.added_cond["text_embeds"][:400].abs().sum(1) == 0
    assert torch.equal(dropped_w, pooled_dropped)
    assert 0.22 < dropped_w.float().mean().item() < 0.38


def test_draws_depend_on_step_slot_and_item_not_on_how_the_batch_is_split():
    """Item 9 at slot 1 gets the same t and noise in a micro-batch of 2 or alone (2 processes, or accumulation)."""
    full = build_inputs(_batch([3, 9]), _cond(), 5, [0, 1], True, "cpu", torch.float32)
    alone = build_inputs({k: v[1:] for k, v in _batch([3, 9]).items()}, _cond(), 5, [1], True, "cpu", torch.float32)
    assert_close(full.timesteps[1], alone.timesteps[0])
    assert_close(full.noisy[1], alone.noisy[0])
    other_step = build_inputs(_batch([3, 9]), _cond(), 6, [0, 1], True, "cpu", torch.float32)
    assert not torch.equal(other_step.noisy, full.noisy)
    other_slot = build_inputs(_batch([3, 9]), _cond(), 5, [2, 3], True, "cpu", torch.float32)  # an item seen twice in a step
    assert not torch.equal(other_slot.noisy, full.noisy)


def test_winner_loser_from_ranks_and_ties():
    ranks = torch.tensor([[1, 0], [0, 1], [0, 0], [2, 0, 1]][:3])
    w, l, label = winner_loser(ranks)
    assert w.tolist() == [1, 0, 0] and l.tolist() == [0, 1, 1]
    assert label.tolist() == [1.0, 1.0, 0.5]
    w, l, label = winner_loser(torch.tensor([[2, 0, 1]]))
    assert (w.item(), l.item(), label.item()) == (1, 0, 1.0)


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
