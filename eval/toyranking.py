"""The toy bench's ranking diagnostics: a model's ranking and reward accuracy on an evaluation-only preference cache of
the evaluation captions (`diffalign.eval.ranking`, after Chen et al., NeurIPS 2024), combined over training seeds, and
how the accuracies relate to the win-rates across methods (Spearman's ρ).

The bench (`diffalign.eval.toybench`: `ranking_config` builds the cache, results are stored by content key) calls
`ranking_record` per model; each model is θ with its own reference (a LoRA's adapters off, a full UNet's base), and the
base model is θ = ref (reward accuracy ½ by construction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffalign.config import Config


def ranking_record(cfg: Config, components, weights: Path | None, draws: int, seed: int) -> dict:
    """Ranking and reward accuracy (value and 95% pair-bootstrap interval) of `weights` (a run's ``final/``; None: the
    base) on the cache of `cfg`, with `draws` (t, ε) draws per pair."""
    from diffalign.eval.ranking import evaluate_ranking

    result = evaluate_ranking(cfg, weights, components=components, device="cpu", draws=draws, seed=seed)

    def estimate(e) -> dict:
        return {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}

    return {"ranking_accuracy": estimate(result.ranking), "reward_accuracy": estimate(result.reward), "pairs": result.pairs,
            "draws": result.draws, "skipped_ties": result.skipped_ties, "seconds": result.settings["seconds"]}


def over_seeds(rows: list[dict]) -> dict:
    """A method's ranking and reward accuracy across its training seeds: per seed, the mean, min and max."""
    out = {}
    for k in ("ranking_accuracy", "reward_accuracy"):
        values = [r[k]["value"] for r in rows]
        out[k] = {"per_seed": values, "mean": float(np.mean(values)), "seed_min": float(min(values)), "seed_max": float(max(values))}
    return out


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of `x`, ties sharing their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties: the mean of their ranks
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's ρ: Pearson's correlation of the average ranks (None when either side is constant or n < 3)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) < 3 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def relation(points: dict[str, dict]) -> dict:
    """Across methods (``points``: name -> {"win_rate", "ranking_accuracy", "reward_accuracy"}), Spearman's ρ of each
    accuracy with the win-rate against the base."""
    names = list(points)
    win = [points[n]["win_rate"] for n in names]
    return {"methods": names, **{f"spearman_{k}": spearman([points[n][k] for n in names], win)
                                 for k in ("ranking_accuracy", "reward_accuracy")}}
