"""Rewards from raw scores: the Syn-Pic preference score φ, Bradley–Terry, pairwise win outcomes.

One implementation each, below the data, scorer and eval layers (imports numpy, torch and the standard
library only; nothing from diffalign):

- `phi` / `win_rate_phi`: RankDPO's Syn-Pic score (arXiv:2410.18013, Algorithm 1;
  research/step_methods.md §5), each image's average pairwise win-rate over n scorers and its K−1 rivals;
- `bradley_terry`: P(a ≻ b) = σ((s_a − s_b) / T), for scorers without a calibrated preference;
- `pairwise_outcomes`: 1 / ½ / 0 per paired sample, the unit of the eval win-rate;
- group rewards of online methods (Pref-GRPO, GRPO; research/npo_grpo.md §3): `preference_matrix` (all C(G, 2)
  pairs of a group, an order-sensitive judge asked in both orders), `win_outcomes` (expected wins or a threshold
  with a tie band), `win_rate`, `group_advantages`, `weighted_advantages` (with the batch renormalisation of
  multi-reward sums), and the log-sigmoid-centred transform `log_sigmoid_centered` / `reference_rewards` of
  Wang et al. 2024 for combining rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------------------------------ group rewards (online)

WIN_RULES = ("expected", "threshold")
# prefer(a, b, prompts) -> (n,) P(a[k] preferred over b[k]); images a list or a B×3×H×W tensor
PreferFn = Callable[[object, object, Sequence[str]], torch.Tensor]


def _take(images, idx: list[int]):
    return images[idx] if isinstance(images, torch.Tensor) else [images[i] for i in idx]


def preference_matrix(prefer: PreferFn, images, prompt: str, *, order_symmetric: bool = True) -> torch.Tensor:
    """P[i, j] = P(image i ≻ image j) over one group of G images of `prompt`, from ONE batched judge call over all
    C(G, 2) pairs i < j (image i shown first), (G, G) float64.

    An order-sensitive judge (``order_symmetric=False``: a VLM that sees "Image 1" and "Image 2") is asked again
    with image j first, in the same call, and the answers are averaged:

        P[i, j] = ½·(p(i first) + 1 − p(j first)),

    so a judge that leans toward the first image by the same amount in both orders no longer decides the pair
    (Pref-GRPO's code asks once, lower index first: every pair inherits the judge's position bias). P[j, i] =
    1 − P[i, j] and the diagonal is ½ by construction.
    """
    g = len(images)
    if g < 2:
        raise ValueError(f"a group needs at least 2 images, got {g}")
    first, second = map(list, zip(*[(i, j) for i in range(g) for j in range(i + 1, g)]))
    a, b = (first + second, second + first) if not order_symmetric else (first, second)
    p = torch.as_tensor(prefer(_take(images, a), _take(images, b), [prompt] * len(a)), dtype=torch.float64).detach().cpu()
    if p.shape != (len(a),):
        raise ValueError(f"the judge returned shape {tuple(p.shape)} for {len(a)} pairs")
    if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"the judge must return probabilities in [0, 1], got {p.tolist()} for prompt {prompt!r}")
    n = len(first)
    p_ij = p[:n] if order_symmetric else 0.5 * (p[:n] + 1 - p[n:])
    out = torch.full((g, g), 0.5, dtype=torch.float64)
    out[first, second] = p_ij
    out[second, first] = 1 - p_ij
    return out


def win_outcomes(p: torch.Tensor, rule: str = "expected", tie_band: float = 0.0) -> torch.Tensor:
    """How a preference probability becomes a win, per pair of a (G, G) matrix `p`:

    - ``expected``: the expected win, o = P (a calibrated judge's probability counts as it is);
    - ``threshold``: a verdict, o = 1 if P > ½ + band, 0 if P < ½ − band, ½ otherwise (Pref-GRPO's judge answers
      "Image 1/2 is better" and an unparsable answer is a tie: its verdicts are P ∈ {0, ½, 1} with band 0).
    """
    if rule == "expected":
        return p
    if rule != "threshold":
        raise ValueError(f"win rule must be one of {WIN_RULES}, got {rule!r}")
    if not 0 <= tie_band < 0.5:
        raise ValueError(f"tie band must be in [0, 0.5), got {tie_band}")
    return torch.where(p > 0.5 + tie_band, 1.0, torch.where(p < 0.5 - tie_band, 0.0, 0.5)).to(p.dtype)


def win_rate(outcomes: torch.Tensor) -> torch.Tensor:
    """Pref-GRPO's reward, WR_i = (wins_i + ½·ties_i) / (G − 1) = Σ_{j≠i} o[i, j] / (G − 1), from (G, G) outcomes."""
    g = outcomes.shape[-1]
    off = ~torch.eye(g, dtype=torch.bool, device=outcomes.device)
    return (outcomes * off).sum(-1) / (g - 1)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8, clip: float | None = 5.0,
                     unbiased: bool = True, std_normalize: bool = True) -> torch.Tensor:
    """A_i = clip((r_i − mean_g) / (std_g + eps), ±clip) over the images i of each group g (the same prompt), (N,).

    Pref-GRPO / DanceGRPO: ``torch.std`` (unbiased), eps 1e-8, advantages clipped to ±5 (`adv_clip_max`). `groups`
    holds a group id per image; every group needs at least 2 images. A group whose rewards all tie gets A = 0.
    ``std_normalize=False``: A_i = r_i − mean_g (Dr. GRPO), no amplification of near-equal rewards.
    """
    rewards = rewards.to(torch.float64)
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must be the same 1-d shape")
    out = torch.empty_like(rewards)
    for gid in torch.unique(groups):
        mask = groups == gid
        if int(mask.sum()) < 2:
            raise ValueError(f"group {int(gid)} has {int(mask.sum())} image: a group advantage needs at least 2")
        r = rewards[mask]
        out[mask] = (r - r.mean()) / (r.std(unbiased=unbiased) + eps) if std_normalize else r - r.mean()
    return out.clamp(-clip, clip) if clip is not None else out


def weighted_advantages(advantages: Mapping[str, torch.Tensor], weights: Mapping[str, float], renormalize: bool = False,
                        eps: float = 1e-8) -> torch.Tensor:
    """Σ_k w_k·A_k over per-reward group advantages (each normalised in its groups first, as Pref-GRPO's reward
    dispatcher does: the paper-era mix was 0.7·A_WR + 1.4·A_CLIP). ``renormalize``: the sum normalised again over
    the whole batch, (s − mean) / (std + eps) (the release's `--apply_gdpo`), so the mix's scale does not depend on
    the weights' sum or on how correlated the rewards are."""
    if set(advantages) != set(weights):
        raise ValueError(f"advantages for {sorted(advantages)} but weights for {sorted(weights)}")
    total = sum(float(weights[k]) * advantages[k].to(torch.float64) for k in advantages)
    if renormalize:
        total = (total - total.mean()) / (total.std() + eps)
    return total


def reference_rewards(base_rewards: torch.Tensor, quantile: float = 0.85) -> torch.Tensor:
    """r_ref(x) per prompt: the `quantile` of the base model's rewards for that prompt, (P, M) -> (P,).

    Wang et al. 2024 ("Transforming and Combining Rewards for Aligning Large Language Models", ICML) centre each
    reward on a per-prompt reference taken from the base policy's own samples; a high quantile (default 0.85) makes
    "good" mean "better than most of what the base model draws for this prompt", so the transformed reward below is
    near 0 only for samples that clear that bar, and strongly negative for the ones that do not.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return torch.quantile(base_rewards.to(torch.float64), quantile, dim=-1)


def log_sigmoid_centered(rewards: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """u = log σ(r − r_ref): the LSC transform of Wang et al. 2024. It saturates at 0 above the reference (little gain
    for improving what is already good, less room to hack the reward) and falls linearly below it; a SUM of
    transformed rewards is the log-probability that a sample is good on every reward at once (a logical AND), where a
    plain weighted sum lets one reward's excess pay for another's failure."""
    return F.logsigmoid(rewards.to(torch.float64) - reference.to(torch.float64))
