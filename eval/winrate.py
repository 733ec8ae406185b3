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
