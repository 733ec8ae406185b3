"""Win-rate of A over B on paired samples, with a 95% bootstrap interval clustered by prompt.

The one implementation diffalign uses (toy bench, `diffalign compare`): samples are paired on
(prompt, seed); a pair counts 1 if A scores higher, ½ on a tie, 0 otherwise. Samples that share a
prompt are correlated, so the interval resamples *prompts* with replacement (all of a prompt's pairs
together) and takes the 2.5 / 97.5 percentiles of the resampled win-rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffalign.rewards import pairwise_outcomes as outcomes  # 1 / ½ / 0 per pair


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    n: int  # paired samples
    prompts: int  # distinct prompts (bootstrap clusters)

    def as_dict(self) -> dict:
        return {"win_rate": self.win_rate, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n, "prompts": self.prompts}


def win_rate(
    score_a: Sequence[float],
    score_b: Sequence[float],
    prompts: Sequence[str],
    *,
    tie_tolerance: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Win-rate of A over B (pairs i share prompts[i] and a seed) with a prompt-clustered 95% interval."""
    wins = outcomes(score_a, score_b, tie_tolerance)
    if len(prompts) != len(wins):
        raise ValueError(f"{len(wins)} pairs but {len(prompts)} prompts")
    if len(wins) == 0:
        raise ValueError("no paired samples")
    names, cluster = np.unique(np.asarray(prompts, dtype=object).astype(str), return_inverse=True)
    k = len(names)
    sums = np.bincount(cluster, weights=wins, minlength=k)  # per-prompt wins
    counts = np.bincount(cluster, minlength=k).astype(np.float64)  # per-prompt pairs
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(n_boot, k))  # each row: k prompts drawn with replacement
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return WinRate(float(wins.mean()), float(low), float(high), int(len(wins)), int(k))


def win_rate_over_seeds(scores_a: Sequence[Sequence[float]], scores_b: Sequence[Sequence[float]], prompts: Sequence[str], *,
                        n_boot: int = 2000, seed: int = 0) -> dict:
    """A's win-rate over B across training seeds: ``scores_a[s]`` pairs with ``scores_b[s]`` (B's own seed s, or the same
    samples for every s when B has no seeds, e.g. the base model), all on the same (prompt, seed) list.

    Returns the per-seed win-rates, their mean, a 95% interval of the mean from ONE prompt-clustered bootstrap shared by
    every seed (each draw resamples prompts once and recomputes every seed's win-rate on them: evaluation sampling), the
    seeds' spread (min, max, sample sd: training), and the call: 'better' / 'worse' when the interval AND every seed
    are on one side of ½, else 'not called' (with 3 seeds only large, consistent differences are called)."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"{len(scores_a)} seeds of A but {len(scores_b)} of B")
    wins = np.stack([outcomes(a, b, 0.0) for a, b in zip(scores_a, scores_b)])  # (seeds, pairs)
    if wins.shape[1] != len(prompts):
        raise ValueError(f"{wins.shape[1]} pairs but {len(prompts)} prompts")
    names, cluster = np.unique(np.asarray(prompts, dtype=object).astype(str), return_inverse=True)
    k = len(names)
    sums = np.stack([np.bincount(cluster, weights=w, minlength=k) for w in wins])  # (seeds, prompts)
    counts = np.bincount(cluster, minlength=k).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    boot = (sums[:, draws].sum(axis=2) / counts[draws].sum(axis=1)).mean(axis=0)  # the seeds' mean, per draw
    low, high = np.percentile(boot, [2.5, 97.5])
    per_seed = wins.mean(axis=1)
    call = "not called"
    if low > 0.5 and per_seed.min() > 0.5:
        call = "better"
    elif high < 0.5 and per_seed.max() < 0.5:
        call = "worse"
    return {"win_rate": float(per_seed.mean()), "ci_low": float(low), "ci_high": float(high), "per_seed": [float(x) for x in per_seed],
            "seed_min": float(per_seed.min()), "seed_max": float(per_seed.max()),
            "seed_sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0, "call": call, "seeds": len(per_seed),
            "n": int(wins.shape[1]), "prompts": int(k)}
