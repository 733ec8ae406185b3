"""Rewards from raw scores: the Syn-Pic preference score φ, Bradley–Terry, pairwise win outcomes.

One implementation each, below the data, scorer and eval layers (imports numpy, torch and the standard
library only; nothing from diffalign):

- `phi` / `win_rate_phi`: RankDPO's Syn-Pic score (arXiv:2410.18013, Algorithm 1;
  research/step_methods.md §5), each image's average pairwise win-rate over n scorers and its K−1 rivals;
- `bradley_terry`: P(a ≻ b) = σ((s_a − s_b) / T), for scorers without a calibrated preference;
- `pairwise_outcomes`: 1 / ½ / 0 per paired sample, the unit of the eval win-rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

TIE_WEIGHTS = {"half": 0.5, "strict": 0.0}


def _check_ties(ties: str) -> None:
    if ties not in TIE_WEIGHTS:
        raise ValueError(f"ties must be one of {sorted(TIE_WEIGHTS)}, got {ties!r}")


def _check_table(table: np.ndarray) -> None:
    """(n_scorers, ..., K) with n ≥ 1, K ≥ 2 and every score finite; a ValueError names the bad item."""
    if table.ndim < 2:
        raise ValueError(f"scores must have shape (n_scorers, ..., K), got shape {table.shape}")
    n, k = table.shape[0], table.shape[-1]
    if n < 1:
        raise ValueError("φ needs the scores of at least one scorer")
    if k < 2:
        raise ValueError(f"win rates need at least 2 images, got {k}")
    bad = np.argwhere(~np.isfinite(table))
    if len(bad):
        r, *item, j = (int(x) for x in bad[0])
        where = f"item {tuple(item) if len(item) > 1 else item[0]}, " if item else ""
        raise ValueError(f"scores must be finite: {where}image {j}, scorer {r} has {table[tuple(bad[0])]}")


def _phi_numpy(table: np.ndarray, ties: str) -> np.ndarray:
    n, k = table.shape[0], table.shape[-1]
    a, b = table[..., :, None], table[..., None, :]  # (n, ..., K, 1) vs (n, ..., 1, K)
    wins = (a > b).sum(axis=(0, -1))  # (..., K) integer counts over scorers and rivals
    if ties == "half":
        wins = wins + 0.5 * ((a == b).sum(axis=(0, -1)) - n)  # the diagonal ties itself n times
    return wins / (n * (k - 1))


def phi(table, ties: str = "half"):
    """Syn-Pic preference score of each of K images, batched: (n_scorers, ..., K) -> (..., K).

    For one item scored by n scorers, s_r(i) = the r-th scorer's raw score of image i (higher = better):

        φ(x^i) = Σ_r Σ_{j≠i} ( [s_r(i) > s_r(j)] + w·[s_r(i) = s_r(j)] ) / (n·(K−1)),   φ ∈ [0, 1].

    ``ties="half"`` (w = ½, diffalign's default): a tie is half a win for both, so Σ_i φ(x^i) = K/2 for
    every item and an all-tied item gets ½ everywhere. ``ties="strict"`` (w = 0): only strict wins count,
    the C_i = Σ_r Σ_{j≠i} [R_r(x^i) > R_r(x^j)] of the Syn-Pic paper (RankDPO arXiv:2410.18013,
    Algorithm 1), so ties lower the sum below K/2 and an all-tied item gets 0.

    `table` is a numpy array (or anything `np.asarray` takes; returns float64 numpy) or a torch tensor
    (returns a tensor on the same device: the input's floating dtype, float64 for integer input). The
    middle axes are items, e.g. (n, B, K) for a batch of B prompts. φ is a rank statistic: no gradient.
    ValueError for unknown `ties`, K < 2, no scorers, or a NaN / infinite score (naming the item).
    """
    _check_ties(ties)
    if isinstance(table, torch.Tensor):
        values = table.detach().to(device="cpu", dtype=torch.float64).numpy()
        _check_table(values)
        out = torch.from_numpy(_phi_numpy(values, ties))
        dtype = table.dtype if table.is_floating_point() else torch.float64
        return out.to(device=table.device, dtype=dtype)
    values = np.asarray(table, dtype=np.float64)
    _check_table(values)
    return _phi_numpy(values, ties)


def win_rate_phi(scores: Mapping[str, Sequence[float]], ties: str = "half") -> list[float]:
    """`phi` of one item given as scorer name -> the K images' scores (higher = better).

    ``win_rate_phi({"a": [3, 1, 2]}) == [1.0, 0.0, 0.5]``; with ties="half" the K values sum to K/2.
    """
    if not scores:
        raise ValueError("win_rate_phi needs the scores of at least one scorer")
    lengths = [len(v) for v in scores.values()]
    if len(set(lengths)) != 1:
        raise ValueError(f"every scorer must score the same number of images, got {lengths}")
    table = np.array([list(v) for v in scores.values()], dtype=np.float64)  # (n, K)
    try:
        return phi(table, ties).tolist()
    except ValueError as err:
        raise ValueError(f"{err} (scorers in order: {list(scores)})") from None


def bradley_terry(score_a: torch.Tensor, score_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """P(a > b) = σ((s_a - s_b) / T): the Bradley–Terry model on scores, for scorers without a calibration."""
    return torch.sigmoid((score_a - score_b) / temperature)


def pairwise_outcomes(score_a: Sequence[float], score_b: Sequence[float], tie_tolerance: float = 0.0) -> np.ndarray:
    """1 where A wins, ½ where |a - b| ≤ tolerance, 0 where B wins (float64, one per pair)."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(np.float64))
