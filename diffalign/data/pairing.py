"""The one place that decides an item's ranks and the pair a pairwise method trains on.

Every item carries one preference signal (`diffalign.data.sources.base.SourceItem`): a `label` (K = 2,
P(images[0] preferred), soft values allowed), `ranks` (0 = best) or `scores` (higher = better). From it:

- ranks: those of the label (images[0] first when label > ½, a tie at ½), else the given ranks, else the
  dense ranks of the scores (a missing score, NaN, ranks last);
- the trained pair (winner slot, loser slot, P(winner preferred)): a labelled pair as labelled, the label
  kept soft (label 0.3 -> images[1] in the winner slot with 0.7); otherwise the best against the worst image
  by rank (a stable sort: the first of equally best images, the last of equally worst), P = 1, or ½ when they
  tie (every image equal).

The dataset applies `data.ties` and `data.min_score_gap` to this pair and hands it to the trainer, so the
rule is written once. Everything is vectorised over items: (n,) labels, (n, K) ranks and scores.
"""

from __future__ import annotations

import numpy as np


def dense_ranks(scores: np.ndarray) -> np.ndarray:
    """Dense rank by descending score along the last axis: [0.9, 0.2, 0.9] -> [0, 1, 0]."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)  # a missing score ranks last
    above = s[..., None, :] > s[..., :, None]  # [..., i, j]: s_j > s_i
    seen_before = np.tril(s[..., None, :] == s[..., :, None], k=-1).any(-1)  # [..., j]: an earlier image has s_j
    return (above & ~seen_before[..., None, :]).sum(-1).astype(np.int64)


def label_ranks(label: np.ndarray) -> np.ndarray:
    """(n,) labels of K = 2 pairs -> (n, 2) ranks: images[0] best above ½, images[1] below, a tie at ½."""
    label = np.asarray(label, dtype=np.float64)
    return np.stack([(label < 0.5), (label > 0.5)], axis=-1).astype(np.int64)


def item_ranks(label: np.ndarray, ranks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, K) ranks from each item's signal: the label's, else the given ranks (rows without them hold -1), else the scores'."""
    out = dense_ranks(scores)
    given = ranks[:, 0] >= 0
    out[given] = ranks[given]
    labelled = ~np.isnan(label)
    if labelled.any():
        out[labelled] = label_ranks(label[labelled])
    return out


def trained_pairs(label: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(winner slot (n,), loser slot (n,), P(winner preferred) (n,)) for labels (n,) (NaN: none) and ranks (n, K)."""
    order = np.argsort(ranks, axis=1, kind="stable")
    winner, loser = order[:, 0].copy(), order[:, -1].copy()
    rows = np.arange(len(ranks))
    p = np.where(ranks[rows, winner] == ranks[rows, loser], 0.5, 1.0)
    labelled = ~np.isnan(label)
    flip = labelled & (label < 0.5)
    winner[labelled], loser[labelled] = np.where(flip, 1, 0)[labelled], np.where(flip, 0, 1)[labelled]
    p[labelled] = np.maximum(label, 1.0 - label)[labelled]
    return winner, loser, p.astype(np.float32)
