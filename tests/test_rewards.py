"""diffalign.rewards: Syn-Pic φ (both tie conventions, batched, numpy and torch), Bradley–Terry, pairwise outcomes."""

import math

import numpy as np
import pytest
import torch

from diffalign.rewards import (
    bradley_terry,
    group_advantages,
    log_sigmoid_centered,
    pairwise_outcomes,
    phi,
    preference_matrix,
    reference_rewards,
    weighted_advantages,
    win_outcomes,
    win_rate,
    win_rate_phi,
)

# two scorers, K = 4; a: images 2 and 3 tie; b: images 1 and 2 tie
A4, B4 = [3.0, 1.0, 2.0, 2.0], [0.0, 1.0, 1.0, 5.0]


# ------------------------------------------------------------------------------------------------ φ


def test_phi_by_hand_k3():
    # a = [1, 1, 0]: image 0 ties 1 and beats 2;  b = [0, 2, 2]: images 1 and 2 tie, both beat 0
    # strict wins  a: [1, 1, 0]  b: [0, 1, 1]  -> C = [1, 2, 1]
    # ties         a: [1, 1, 0]  b: [0, 1, 1]  -> T = [1, 2, 1];  denominator n·(K−1) = 4
    table = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert phi(table, ties="strict").tolist() == [1 / 4, 2 / 4, 1 / 4]
    assert phi(table).tolist() == [1.5 / 4, 3 / 4, 1.5 / 4]
    assert phi(table, ties="half").sum() == pytest.approx(3 / 2)


def test_phi_by_hand_k4():
    # strict wins a: [3, 0, 1, 1]  b: [0, 1, 1, 3] -> [3, 1, 2, 4];  ties a: [0, 0, 1, 1]  b: [0, 1, 1, 0]
    table = np.array([A4, B4])
    assert phi(table, ties="strict").tolist() == pytest.approx([3 / 6, 1 / 6, 2 / 6, 4 / 6])
    assert phi(table, ties="half").tolist() == pytest.approx([3 / 6, 1.5 / 6, 3 / 6, 4.5 / 6])
    assert win_rate_phi({"a": A4, "b": B4}, ties="strict") == phi(table, ties="strict").tolist()


def test_phi_all_tied_item():
    table = np.full((3, 5), 7.0)
    assert phi(table, ties="strict").tolist() == [0.0] * 5
    assert phi(table, ties="half").tolist() == [0.5] * 5


def _random_table(rng, n, b, k):
    return rng.integers(0, 3, size=(n, b, k)).astype(np.float64)  # 3 levels: many ties


@pytest.mark.parametrize("ties", ["half", "strict"])
def test_phi_batched_equals_per_item(ties):
    rng = np.random.default_rng(0)
    for n, b, k in [(1, 5, 2), (2, 7, 3), (5, 4, 4), (3, 6, 7)]:
        table = _random_table(rng, n, b, k)
        out = phi(table, ties=ties)
        assert out.shape == (b, k) and out.dtype == np.float64
        for i in range(b):
            item = {f"s{r}": table[r, i].tolist() for r in range(n)}
            assert out[i].tolist() == win_rate_phi(item, ties=ties)  # exactly equal, not approx


def test_phi_half_sums_to_half_k_and_strict_does_not_exceed_it():
    rng = np.random.default_rng(1)
    table = _random_table(rng, 3, 50, 4)
    half, strict = phi(table), phi(table, ties="strict")
    assert half.sum(axis=-1) == pytest.approx(np.full(50, 4 / 2))
    assert (strict.sum(axis=-1) <= 4 / 2 + 1e-12).all()
    assert ((0 <= strict) & (strict <= half) & (half <= 1)).all()


def test_phi_extra_item_axes():
    rng = np.random.default_rng(2)
    table = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(np.float64)  # (n, B1, B2, K)
    flat = phi(table.reshape(2, 12, 5))
    assert np.array_equal(phi(table), flat.reshape(3, 4, 5))


def test_phi_torch_matches_numpy():
    rng = np.random.default_rng(3)
    table = _random_table(rng, 2, 6, 4)
    for ties in ("half", "strict"):
        expected = phi(table, ties=ties)
        got = phi(torch.from_numpy(table), ties=ties)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        assert np.array_equal(got.numpy(), expected)
        got32 = phi(torch.from_numpy(table).float(), ties=ties)
        assert got32.dtype == torch.float32 and torch.allclose(got32.double(), torch.from_numpy(expected))
        got_int = phi(torch.from_numpy(table).long(), ties=ties)
        assert got_int.dtype == torch.float64 and np.array_equal(got_int.numpy(), expected)


def test_phi_win_rate_phi_matches_the_previous_implementation_exactly():
    """Cached synthetic data hashes depend on these exact float64 values (ties="half")."""

    def previous(scores):
        table = np.array([list(v) for v in scores.values()], dtype=np.float64)
        n, k = table.shape
        a, b = table[:, :, None], table[:, None, :]
        wins = (a > b).sum(axis=(0, 2)) + 0.5 * ((a == b).sum(axis=(0, 2)) - n)
        return (wins / (n * (k - 1))).tolist()

    rng = np.random.default_rng(4)
    for k in (2, 3, 4, 7):
        for n in (1, 2, 3, 5):
            for _ in range(5):
                scores = {f"s{r}": rng.integers(0, 3, size=k).astype(float).tolist() for r in range(n)}
                assert win_rate_phi(scores) == previous(scores)
                scores = {f"s{r}": rng.normal(size=k).tolist() for r in range(n)}
                assert win_rate_phi(scores) == previous(scores)


def test_phi_rejects_bad_input():
    with pytest.raises(ValueError, match="ties"):
        phi(np.zeros((1, 3)), ties="quarter")
    with pytest.raises(ValueError, match="at least 2 images"):
        phi(np.zeros((2, 4, 1)))
    with pytest.raises(ValueError, match="shape"):
        phi(np.zeros(3))
    with pytest.raises(ValueError, match="at least one scorer"):
        phi(np.zeros((0, 3)))
    table = np.zeros((2, 5, 3))
    table[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="item 3"):
        phi(table)
    with pytest.raises(ValueError, match="item 3"):
        phi(torch.from_numpy(table))
    table[1, 3, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        phi(table)
    with pytest.raises(ValueError, match="ties"):
        win_rate_phi({"a": [1.0, 2.0]}, ties="none")


# ----------------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_by_hand():
    a, b = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    sigma = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert bradley_terry(a, b).tolist() == pytest.approx([sigma(1.0), 0.5, sigma(-2.0)])
    assert bradley_terry(a, b, temperature=0.5).tolist() == pytest.approx([sigma(2.0), 0.5, sigma(-4.0)])
    assert (bradley_terry(a, b) + bradley_terry(b, a)).tolist() == pytest.approx([1.0, 1.0, 1.0])


# -------------------------------------------------------------------------------- pairwise outcomes


def test_pairwise_outcomes_by_hand():
    a, b = [3.0, 1.0, 2.0, 2.05, 2.0], [1.0, 3.0, 2.0, 2.0, 2.3]
    assert pairwise_outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert pairwise_outcomes(a, b, tie_tolerance=0.1).tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert pairwise_outcomes(a, b, tie_tolerance=0.5).tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="differ"):
        pairwise_outcomes([1.0, 2.0], [1.0])


def test_old_names_are_the_one_implementation():
    from diffalign.data.sources import synthetic
    from diffalign.eval import winrate
    from diffalign.scorers import base

    assert synthetic.win_rate_phi is win_rate_phi
    assert base.bradley_terry is bradley_terry
    assert winrate.outcomes is pairwise_outcomes


# ------------------------------------------------------------------------------------------------ group rewards


def _verdict(scores):
    """A judge that answers 1 / ½ / 0 from known scores, order-symmetric by construction."""
    def prefer(a, b, prompts):
        return torch.tensor([1.0 if scores[i] > scores[j] else 0.0 if scores[i] < scores[j] else 0.5 for i, j in zip(a, b)])
    return prefer


def test_win_rate_with_ties_by_hand():
    # scores 3, 1, 3: image 0 beats 1 and ties 2 -> (1 + ½)/2; image 1 loses both -> 0; image 2 as image 0
    p = preference_matrix(_verdict([3.0, 1.0, 3.0]), [0, 1, 2], "a prompt")
    assert p.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    assert win_rate(win_outcomes(p, "threshold")).tolist() == [0.75, 0.0, 0.75]
    assert win_rate(p).sum().item() == pytest.approx(3 / 2)  # G/2 always: every pair hands out exactly one win


def test_a_position_biased_judge_is_asked_in_both_orders():
    scores, calls = [0.0, 0.5, 3.0], []

    def biased(a, b, prompts):  # the first image wins unless the other is better by at least 1
        calls.append(len(a))
        return torch.tensor([0.0 if scores[j] - scores[i] >= 1 else 1.0 if scores[i] - scores[j] >= 1 else 1.0
                             for i, j in zip(a, b)])

    # both orders: (0, 1) -> ½·(1 + 1 − 1) = ½, a tie; (0, 2) and (1, 2) -> 0; WR = [¼, ¼, 1]
    fair = win_rate(preference_matrix(biased, [0, 1, 2], "p", order_symmetric=False))
    assert fair.tolist() == [0.25, 0.25, 1.0] and calls == [6]  # one batched call over 2 · C(3, 2) pairs
    # asked once, lower index first (the official code): the bias decides (0, 1)
    assert win_rate(preference_matrix(biased, [0, 1, 2], "p")).tolist() == [0.5, 0.0, 1.0]


def test_expected_wins_and_the_tie_band_by_hand():
    s = [0.0, math.log(3.0)]
    bt = lambda a, b, prompts: torch.sigmoid(torch.tensor([s[j] for j in b]).neg() + torch.tensor([s[i] for i in a]))  # noqa: E731
    p = preference_matrix(bt, [0, 1], "p")
    assert p[0, 1].item() == pytest.approx(1 / (1 + 3))  # σ(−ln 3) = ¼
    assert win_rate(win_outcomes(p, "expected")).tolist() == pytest.approx([0.25, 0.75])
    assert win_rate(win_outcomes(p, "threshold", tie_band=0.2)).tolist() == [0.0, 1.0]  # ¼ < ½ − 0.2
    assert win_rate(win_outcomes(p, "threshold", tie_band=0.3)).tolist() == [0.5, 0.5]  # inside the band: a tie


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0])
    a = group_advantages(r, torch.tensor([0, 0, 0, 1, 1]))
    assert a.tolist() == pytest.approx([-1 / (1 + 1e-8), 0.0, 1 / (1 + 1e-8), 0.0, 0.0])  # unbiased std of 1, 2, 3 is 1
    r = torch.tensor([0.0] * 29 + [1.0])  # one good image among 30: (29/30) / sqrt(1/30) = 5.29 > 5
    raw = group_advantages(r, torch.zeros(30, dtype=torch.long), clip=None)
    assert raw[-1].item() == pytest.approx((29 / 30) / math.sqrt(1 / 30), rel=1e-6)
    assert group_advantages(r, torch.zeros(30, dtype=torch.long))[-1].item() == 5.0
    biased_std = math.sqrt((29 * (1 / 30) ** 2 + (29 / 30) ** 2) / 30)  # mean squared deviation from 1/30
    assert group_advantages(r, torch.zeros(30, dtype=torch.long), clip=None, unbiased=False)[-1].item() == pytest.approx(
        (29 / 30) / biased_std, rel=1e-6)
    with pytest.raises(ValueError, match="group 7 has 1 image"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 7]))


def test_group_advantages_without_the_std_keep_near_ties_near_zero():
    # Dr. GRPO: A = r − mean. A near-tied group (0.95, 0.96) stays at ±0.005 where the std would make it ±0.707
    r = torch.tensor([0.95, 0.96, 0.2, 1.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 1, 1])
    assert group_advantages(r, g, std_normalize=False).tolist() == pytest.approx([-0.005, 0.005, -0.4, 0.4])
    half = 1 / math.sqrt(2)  # (r − mean) / unbiased std of two values is ±1/√2 whatever their gap
    assert group_advantages(r, g).tolist() == pytest.approx([-half, half, -half, half], rel=1e-5)  # eps 1e-8 / std 0.007


def test_weighted_advantages_and_batch_renormalisation_by_hand():
    adv = {"wr": torch.tensor([1.0, -1.0]), "clip": torch.tensor([2.0, 0.0])}
    w = {"wr": 0.7, "clip": 1.4}  # the paper-era Pref-GRPO mix
    assert weighted_advantages(adv, w).tolist() == pytest.approx([3.5, -0.7])
    std = 4.2 / math.sqrt(2)  # unbiased std of [3.5, −0.7]
    assert weighted_advantages(adv, w, renormalize=True).tolist() == pytest.approx([2.1 / std, -2.1 / std])
    with pytest.raises(ValueError, match="weights for"):
        weighted_advantages(adv, {"wr": 1.0})


def test_log_sigmoid_centered_by_hand():
    assert reference_rewards(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])).tolist() == pytest.approx([3.4])  # 0.85 · 4
    u = log_sigmoid_centered(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert u.tolist() == pytest.approx([math.log(1 / (1 + math.e)), math.log(1 / (1 + math.exp(-1)))])
    # the sum rewards being good on both: (0, 0) above both references beats (+3, −3) with the same plain sum
    ref = torch.tensor([-1.0, -1.0])
    both = log_sigmoid_centered(torch.tensor([0.0, 0.0]), ref).sum()
    lopsided = log_sigmoid_centered(torch.tensor([3.0, -3.0]), ref).sum()
    assert both > lopsided


def test_group_reward_refusals():
    with pytest.raises(ValueError, match="at least 2 images"):
        preference_matrix(_verdict([1.0]), [0], "p")
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        preference_matrix(lambda a, b, p: torch.tensor([1.5]), [0, 1], "p")
    with pytest.raises(ValueError, match="win rule"):
        win_outcomes(torch.eye(2), "majority")
