"""The toy bench's ranking diagnostics: ranking and reward accuracy of every trained model on an evaluation-only
preference cache of the evaluation captions (`diffalign.eval.ranking`, after Chen et al., NeurIPS 2024), and how they
relate to the win-rates across methods.

The cache: ``ranking_rounds`` synthetic ranked lists per evaluation caption (the bench's K, sampler and checklist, as
the training data; image seeds of their own: the synthetic seed is the bench's + 1), marked evaluation-only so no
trainer can use it. The pair of a list is its best and worst image by φ, as in training. Each model is θ with its own
reference (a LoRA's adapters off, a full UNet's base); the base model is θ = ref (reward accuracy ½ by construction).

A result is stored under ``<cache_root>/ranking/<key>.json``; the key digests the model (its run key, or the base),
the cache's data key, the draws, the seed, the package's source digest and this module's and `diffalign.eval.ranking`'s
source, so a result is reused only when it would come out the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from diffalign.config import Config, read_yaml, shipped_config_path, validate_config
from diffalign.io import atomic_write_text

CONFIG = "toy_eval_heldout"  # the shipped evaluation-cache recipe the bench's ranking cache starts from


def ranking_config(settings, captions: list[str], root: Path) -> Config:
    """The evaluation-only cache config: `captions` × ``settings.ranking_rounds`` ranked lists of the base model's samples,
    stored at ``<root>/data/<data key>``."""
    from diffalign.eval.toybench import SCORER, data_key

    path = shipped_config_path(CONFIG)
    raw = read_yaml(path)
    raw["model"]["pretrained"] = settings.model
    raw["data"]["source"].update(prompts=list(captions) * settings.ranking_rounds, images_per_prompt=settings.images_per_prompt,
                                 scorers=[SCORER], num_inference_steps=settings.num_inference_steps,
                                 guidance_scale=settings.guidance_scale, seed=settings.seed + 1, evaluation_only=True)
    origin = f"{path} (bench toy ranking)"
    raw["data"]["cache_dir"] = str(root / "data" / data_key(validate_config(raw, origin=origin)))
    return validate_config(raw, origin=origin)


def _source(*modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


def cell_ranking(cfg: Config, components, model: str, weights: Path | None, settings, root: Path, code: str) -> dict:
    """Ranking and reward accuracy of one model (`weights`: a run's ``final/``; None: the base) on the cache of `cfg`,
    computed or reused from ``<root>/ranking``. `model` names it in the key (a run key, or "base")."""
    import sys

    from diffalign.eval import ranking
    from diffalign.eval.toybench import _digest, _locked, numerics

    key = _digest({"model": model, "data": Path(cfg.data.cache_dir).name, "draws": settings.ranking_draws, "seed": settings.seed,
                   "code": code, "numerics": numerics(), "source": _source(ranking, sys.modules[__name__])})
    path = root / "ranking" / f"{key}.json"
    with _locked(path.with_suffix(".lock")):
        if path.is_file() and not settings.fresh:
            return {**json.loads(path.read_text()), "reused": True}
        result = ranking.evaluate_ranking(cfg, weights, components=components, device="cpu", draws=settings.ranking_draws,
                                          seed=settings.seed)
        record = {"ranking_accuracy": _estimate(result.ranking), "reward_accuracy": _estimate(result.reward), "pairs": result.pairs,
                  "draws": result.draws, "skipped_ties": result.skipped_ties, "seconds": result.settings["seconds"], "key": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return {**record, "reused": False}


def _estimate(e) -> dict:
    return {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}


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
