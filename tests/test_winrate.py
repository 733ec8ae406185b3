"""The win-rate: ties count ½, the interval resamples prompts (clusters), not single pairs."""

import numpy as np
import pytest

from diffalign.eval.winrate import outcomes, win_rate


def test_outcomes_by_hand():
    assert outcomes([3, 1, 2, 2.05], [1, 3, 2, 2.0], tie_tolerance=0.1).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert outcomes([3, 1, 2, 2.05], [1, 3, 2, 2.0]).tolist() == [1.0, 0.0, 0.5, 1.0]


def test_point_estimate_and_counts_by_hand():
    # p1: win, win; p2: tie, loss; p3: win -> (1 + 1 + .5 + 0 + 1) / 5 = 0.7
    r = win_rate([2, 2, 1, 0, 5], [1, 1, 1, 1, 4], ["p1", "p1", "p2", "p2", "p3"])
    assert r.win_rate == pytest.approx(0.7) and r.n == 5 and r.prompts == 3
    assert r.ci_low <= 0.7 <= r.ci_high


def test_all_wins_gives_a_degenerate_interval():
    r = win_rate([1] * 6, [0] * 6, list("aabbcc"))
    assert (r.win_rate, r.ci_low, r.ci_high) == (1.0, 1.0, 1.0)


def test_clustering_widens_the_interval_when_prompts_decide_the_outcome():
    """Each prompt's pairs all win or all lose: clustered resampling sees 20 independent units, not 200."""
    prompts = [f"p{i // 10}" for i in range(200)]
    a = [1.0 if (i // 10) % 2 == 0 else 0.0 for i in range(200)]
    clustered = win_rate(a, [0.5] * 200, prompts, seed=1)
    unclustered = win_rate(a, [0.5] * 200, [str(i) for i in range(200)], seed=1)
    assert clustered.win_rate == unclustered.win_rate == 0.5
    assert (clustered.ci_high - clustered.ci_low) > 2 * (unclustered.ci_high - unclustered.ci_low)


def test_interval_is_reproducible_by_seed_and_errors_are_clear():
    args = (np.arange(30) % 3, np.ones(30), [str(i % 7) for i in range(30)])
    assert win_rate(*args, seed=4) == win_rate(*args, seed=4)
    with pytest.raises(ValueError, match="differ in length"):
        win_rate([1, 2], [1], ["a", "b"])
    with pytest.raises(ValueError, match="2 pairs but 1 prompts"):
        win_rate([1, 2], [1, 2], ["a"])


def test_across_seeds_by_hand():
    """Per-seed win-rates and their mean by hand; one seed is the ordinary win-rate (same interval, same bootstrap);
    the interval of the mean is from prompts resampled once for all seeds, so it is no wider than the widest seed's."""
    from diffalign.eval.winrate import win_rate_over_seeds

    prompts = ["p1", "p1", "p2", "p2", "p3"]
    base = [1, 1, 1, 1, 4]
    seed0, seed1 = [2, 2, 1, 0, 5], [0, 2, 2, 2, 3]  # 0.7 (as above); p1 loss+win, p2 win+win, p3 loss: 3/5 = 0.6
    r = win_rate_over_seeds([seed0, seed1], [base, base], prompts, seed=3)
    assert r["per_seed"] == pytest.approx([0.7, 0.6]) and r["win_rate"] == pytest.approx(0.65)
    assert (r["seed_min"], r["seed_max"]) == pytest.approx((0.6, 0.7)) and r["seed_sd"] == pytest.approx(np.std([0.7, 0.6], ddof=1))
    one = win_rate_over_seeds([seed0], [base], prompts, seed=3)
    alone = win_rate(seed0, base, prompts, seed=3)
    assert (one["win_rate"], one["ci_low"], one["ci_high"]) == pytest.approx((alone.win_rate, alone.ci_low, alone.ci_high))
    widest = max(win_rate(s, base, prompts, seed=3).ci_high - win_rate(s, base, prompts, seed=3).ci_low for s in (seed0, seed1))
    assert r["ci_high"] - r["ci_low"] <= widest + 1e-12
    # the call needs the interval and every seed on one side of 1/2
    ten = [f"p{i}" for i in range(10)]
    assert win_rate_over_seeds([[1] * 10, [1] * 10], [[0] * 10] * 2, ten)["call"] == "better"
    assert win_rate_over_seeds([[0] * 10, [0] * 10], [[1] * 10] * 2, ten)["call"] == "worse"
    assert win_rate_over_seeds([[1] * 10, [-1] * 9 + [1]], [[0] * 10] * 2, ten)["call"] == "not called"  # one seed disagrees
    with pytest.raises(ValueError, match="seeds of A"):
        win_rate_over_seeds([seed0, seed1], [base], prompts)
