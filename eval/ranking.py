"""Ranking diagnostics: does the model order a preference pair as the data does, by its own likelihood and by its
implicit reward?

After Chen et al., "Preference Learning Algorithms Do Not Learn Preference Rankings" (NeurIPS 2024), adapted to
diffusion as Diffusion-DPO (Wallace et al., 2023) scores an image: for a preference pair (w, l) (the trained pair of
`LatentBatch.pair()`: winner = slot 0, whatever its soft label) and one draw (t, ε) shared by both images,
x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε and e(x) = ‖prediction - target‖² averaged over C, H, W (`denoising_errors`). Then

    ranking accuracy = 1[e_θ(w) < e_θ(l)]                                     (the model's own likelihood order)
    reward accuracy  = 1[(e_θ(w) - e_ref(w)) < (e_θ(l) - e_ref(l))]           (the order of the DPO implicit reward)

with an exact tie counted ½ (`diffalign.rewards.pairwise_outcomes`). Reward accuracy is the sign of the Diffusion-DPO
logit -β/2·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))], so it does not depend on β. At θ = ref it is exactly 0.5 by
construction: both differences are 0, every draw is a tie (when no trained weights are given, the reference errors
ARE the policy errors, not a second forward that could round differently).

Each pair gets N draws (t, ε, and the posterior sample of its latents), t uniform on {0, ..., T-1} as in training,
all from `Draws` keyed by (a seed of their own, draw index, item id), so the numbers do not depend on the batch size or
the order of the items, and never coincide with a training run's draws. Captions are never dropped. Accuracies are
averaged over all pair × draw outcomes, overall and per timestep bucket ([b·T/n, (b+1)·T/n), n equal buckets); the
95% interval is a percentile bootstrap over PAIRS (the independent unit: a pair's draws are resampled together; a
bucket's accuracy in a resample is its outcomes' sum over its draw count). Pairs kept as ties (`data.ties = keep`,
P(winner) = 0.5) have no preferred side and are skipped (counted in `skipped_ties`).

Reference: for a LoRA output the same UNet with its adapters disabled, for a full UNet output the base UNet, and
without trained weights the base model is both θ and ref (ranking accuracy of the base model; reward accuracy 0.5).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffalign.data.errors import DataError
from diffalign.models.loading import Components
from diffalign.randomness import Draws, seed63
from diffalign.rewards import pairwise_outcomes
from diffalign.trainers.batch import BatchRules, build_batch
from diffalign.trainers.methods.denoising import denoising_errors
from diffalign.trainers.models import Models, Schedule

DEFAULT_DRAWS = 8
DEFAULT_BUCKETS = 10
DEFAULT_BOOTSTRAP = 2000
DRAW_KEY = "diffalign-ranking"  # the draws' seed is seed63(f"{DRAW_KEY}\0{seed}"), never a training seed


# ------------------------------------------------------------------------------------------------ outcomes


def ranking_outcomes(e_w: np.ndarray, e_l: np.ndarray) -> np.ndarray:
    """1[e_θ(w) < e_θ(l)] + ½·1[e_θ(w) = e_θ(l)], elementwise (float64)."""
    return pairwise_outcomes(np.asarray(e_l, np.float64).ravel(), np.asarray(e_w, np.float64).ravel()).reshape(np.shape(e_w))


def reward_outcomes(e_w: np.ndarray, e_l: np.ndarray, r_w: np.ndarray, r_l: np.ndarray) -> np.ndarray:
    """1[(e_θ(w) - e_ref(w)) < (e_θ(l) - e_ref(l))] + ½·1[equal], elementwise (float64; 0.5 everywhere when θ = ref)."""
    d_w = np.asarray(e_w, np.float64) - np.asarray(r_w, np.float64)
    d_l = np.asarray(e_l, np.float64) - np.asarray(r_l, np.float64)
    return ranking_outcomes(d_w, d_l)


def timestep_buckets(t: np.ndarray, num_train_timesteps: int, buckets: int) -> np.ndarray:
    """Bucket b of timestep t among `buckets` equal buckets of [0, T): b = ⌊t·buckets / T⌋."""
    t = np.asarray(t, np.int64)
    if t.size and (t.min() < 0 or t.max() >= num_train_timesteps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps})")
    return t * buckets // num_train_timesteps


@dataclass(frozen=True)
class Estimate:
    """A mean of pair × draw outcomes with its 95% pair-bootstrap interval (None when no draw fell here)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    draws: int  # outcomes averaged (pair × draw)
    pairs: int  # pairs with at least one of them


def pair_bootstrap(outcomes: np.ndarray, mask: np.ndarray | None = None, *, resamples: np.ndarray) -> Estimate:
    """Mean of `outcomes` (P, N) where `mask` (P, N) holds, and the 2.5 / 97.5 percentiles of the same ratio over
    `resamples` (B, P): rows of pair indices drawn with replacement (resamples without any masked draw are left out)."""
    outcomes = np.asarray(outcomes, np.float64)
    mask = np.ones(outcomes.shape, bool) if mask is None else np.asarray(mask, bool)
    sums, counts = (outcomes * mask).sum(axis=1), mask.sum(axis=1).astype(np.float64)
    total = int(counts.sum())
    if total == 0:
        return Estimate(None, None, None, 0, 0)
    boot_counts = counts[resamples].sum(axis=1)
    kept = boot_counts > 0
    boot = sums[resamples[kept]].sum(axis=1) / boot_counts[kept]
    low, high = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(sums.sum() / total), float(low), float(high), total, int((counts > 0).sum()))


def bootstrap_resamples(pairs: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, pairs) pair indices drawn with replacement, from numpy's PCG64 seeded with `seed`."""
    return np.random.default_rng(seed).integers(0, pairs, size=(n_boot, pairs))


# ------------------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class Bucket:
    t_low: int  # timesteps [t_low, t_high)
    t_high: int
    ranking: Estimate
    reward: Estimate


@dataclass
class RankingResult:
    ranking: Estimate
    reward: Estimate
    buckets: list[Bucket]
    pairs: int
    draws: int  # per pair
    seed: int
    n_boot: int
    num_train_timesteps: int
    policy: str
    reference: str
    skipped_ties: int = 0
    settings: dict = field(default_factory=dict)  # what the caller ran it on (config, cache, weights), for the report

    def as_dict(self) -> dict:
        return {
            "ranking_accuracy": asdict(self.ranking),
            "reward_accuracy": asdict(self.reward),
            "buckets": [asdict(b) for b in self.buckets],
            "pairs": self.pairs,
            "draws_per_pair": self.draws,
            "seed": self.seed,
            "bootstrap": {"resamples": self.n_boot, "unit": "pair", "interval": "percentile 2.5 / 97.5"},
            "num_train_timesteps": self.num_train_timesteps,
            "policy": self.policy,
            "reference": self.reference,
            "skipped_ties": self.skipped_ties,
            "definitions": {
                "ranking_accuracy": "mean of 1[e_theta(w) < e_theta(l)] + 0.5*1[equal] over pairs x draws (t, eps shared by w, l)",
                "reward_accuracy": "mean of 1[(e_theta(w) - e_ref(w)) < (e_theta(l) - e_ref(l))] + 0.5*1[equal]; 0.5 at theta = ref "
                "by construction",
                "e": "per-image MSE of the UNet prediction against its target, mean over C, H, W (Diffusion-DPO)",
            },
            **self.settings,
        }


def summarize(errors: dict[str, np.ndarray], num_train_timesteps: int, *, buckets: int = DEFAULT_BUCKETS,
              n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[Estimate, Estimate, list[Bucket]]:
    """Overall and per-bucket accuracies from per pair × draw arrays (P, N): e_w, e_l, r_w, r_l and t."""
    rank = ranking_outcomes(errors["e_w"], errors["e_l"])
    reward = reward_outcomes(errors["e_w"], errors["e_l"], errors["r_w"], errors["r_l"])
    resamples = bootstrap_resamples(rank.shape[0], n_boot, seed)
    which = timestep_buckets(errors["t"], num_train_timesteps, buckets)
    rows = []
    for b in range(buckets):
        mask = which == b
        lo, hi = -(-b * num_train_timesteps // buckets), -(-(b + 1) * num_train_timesteps // buckets)  # ⌈b·T/n⌉
        rows.append(Bucket(lo, hi, pair_bootstrap(rank, mask, resamples=resamples), pair_bootstrap(reward, mask, resamples=resamples)))
    return pair_bootstrap(rank, resamples=resamples), pair_bootstrap(reward, resamples=resamples), rows


# ------------------------------------------------------------------------------------------------ models


class _Device:
    """What `Models` asks of an `accelerate.Accelerator`: a device, autocast (none: evaluation runs in float32) and
    unwrap (nothing is wrapped)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model


@dataclass
class EvaluationModels:
    models: Models
    policy: str  # what θ is, for the report
    reference: str  # what ref is
    theta_is_reference: bool  # no trained weights: the reference is not run, its errors are the policy's


def evaluation_models(components: Components, weights: str | Path | None = None, device: str | torch.device = "cpu") -> EvaluationModels:
    """θ = the trained output in `weights` (a run's ``final/``, `load_trained_unet`) or the base model, and its reference.

    LoRA output: the reference is the same UNet with its adapters disabled; full UNet: the base UNet of `components`;
    no weights: the base UNet is both. Everything runs in float32 on `device` (the base UNet of `components` is moved).
    """
    from diffalign.models.sampling import load_trained_unet

    dev = _Device(device)
    schedule = Schedule(components.scheduler.alphas_cumprod.float(), components.prediction_type)
    base = components.unet.to(dev.device, torch.float32).eval()
    if weights is None:
        return EvaluationModels(Models(base, dev, schedule, torch.float32, lora=False, frozen_reference=base), "base", "base", True)
    unet = load_trained_unet(components, weights).to(dev.device, torch.float32).eval()
    if getattr(unet, "peft_config", None):
        models = Models(unet, dev, schedule, torch.float32, lora=True)
        return EvaluationModels(models, f"{weights} (LoRA)", "the same UNet, adapters disabled", False)
    models = Models(unet, dev, schedule, torch.float32, lora=False, frozen_reference=base)
    return EvaluationModels(models, f"{weights} (full UNet)", "the base UNet", False)


# ------------------------------------------------------------------------------------------------ running


@torch.no_grad()
def ranking_errors(models: Models, components: Components, dataset, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                   batch_size: int = 32, theta_is_reference: bool = False, progress: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Per pair × draw arrays (P, N) of e_θ(w), e_θ(l), e_ref(w), e_ref(l) and t, and the number of skipped tied pairs.

    `theta_is_reference`: the reference is not run and its errors are the policy's (θ = ref exactly)."""
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    rules = BatchRules(models.schedule.num_train_timesteps, components.vae.config.scaling_factor, dataset.empty_prompt_embeds,
                       dataset.empty_pooled, caption_dropout=0.0)
    key = seed63(f"{DRAW_KEY}\0{seed}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="ranking", unit="batch", dynamic_ncols=True)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("e_w", "e_l", "r_w", "r_l", "t")}
    skipped = 0
    for raw in loader:
        keep = raw["pair_label"] != 0.5
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        raw = _select(raw, keep)
        ids = raw["item_id"].tolist()
        per_draw: dict[str, list[np.ndarray]] = {k: [] for k in cols}
        for d in range(draws):
            batch = build_batch(raw, rules, Draws(key, d, [0] * len(ids), ids))  # slot 0: no dependence on the batch
            err = denoising_errors(models, batch, batch.pair().images, reference=not theta_is_reference)
            ref = err.policy if theta_is_reference else err.reference
            for name, values in (("e_w", err.policy[:, 0]), ("e_l", err.policy[:, 1]), ("r_w", ref[:, 0]), ("r_l", ref[:, 1]), ("t", batch.t)):
                per_draw[name].append(values.detach().to("cpu", torch.float64 if name != "t" else torch.int64).numpy())
        for name, column in cols.items():
            column.append(np.stack(per_draw[name], axis=1))
    if not cols["t"]:
        raise DataError(f"the cache at {dataset.root} has no preference pairs to rank ({skipped} tied pairs skipped)")
    return {k: np.concatenate(v) for k, v in cols.items()}, skipped


def _select(raw: dict, keep: torch.Tensor) -> dict:
    """The rows `keep` of a collated batch (nested dicts too)."""
    return {k: _select(v, keep) if isinstance(v, dict) else v[keep] for k, v in raw.items()}


def ranking_diagnostics(models: Models, components: Components, dataset, *, draws: int = DEFAULT_DRAWS, buckets: int = DEFAULT_BUCKETS,
                        seed: int = 0, n_boot: int = DEFAULT_BOOTSTRAP, batch_size: int = 32, theta_is_reference: bool = False,
                        progress: bool = False, policy: str = "policy", reference: str = "reference") -> RankingResult:
    """Ranking and reward accuracy of `models` on the trained pairs of `dataset` (see the module docstring)."""
    started = time.perf_counter()
    errors, skipped = ranking_errors(models, components, dataset, draws=draws, seed=seed, batch_size=batch_size,
                                     theta_is_reference=theta_is_reference, progress=progress)
    total, reward, rows = summarize(errors, models.schedule.num_train_timesteps, buckets=buckets, n_boot=n_boot, seed=seed)
    return RankingResult(total, reward, rows, errors["t"].shape[0], draws, seed, n_boot, models.schedule.num_train_timesteps, policy,
                         reference, skipped, {"seconds": time.perf_counter() - started})


def evaluate_ranking(cfg, weights: str | Path | None = None, *, components: Components | None = None, device: str | None = None,
                     progress: bool = False, **options) -> RankingResult:
    """`ranking_diagnostics` on the cache of `cfg` (built first if missing), for the trained output `weights` or the base."""
    from diffalign.data import LatentPairDataset, prepare_cache
    from diffalign.models.loading import load_components

    components = components or load_components(cfg.model)
    prepare_cache(cfg, components, progress=progress)  # before the trained weights: a synthetic source samples the base model
    if cfg.model.init_from:  # the run started there: it is the reference, and a LoRA output sits on top of it
        from diffalign.models.init_from import start_from

        components = start_from(components, cfg.model.init_from)
    dataset = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = evaluation_models(components, weights, device)
    result = ranking_diagnostics(m.models, components, dataset, theta_is_reference=m.theta_is_reference, progress=progress,
                                 policy=m.policy, reference=m.reference, **options)
    result.settings.update({"cache_dir": str(cfg.data.cache_dir), "weights": None if weights is None else str(weights),
                            "evaluation_only_cache": bool(dataset.manifest.get("evaluation_only", False)), "device": str(device)})
    return result


# ------------------------------------------------------------------------------------------------ table


def _fmt(e: Estimate) -> str:
    return "n/a" if e.value is None else f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"


def markdown_table(result: RankingResult) -> str:
    """Overall and per-bucket accuracies with their intervals, as a markdown table."""
    lines = [
        f"ranking diagnostics: {result.pairs} pairs × {result.draws} draws; θ = {result.policy}; ref = {result.reference}"
        + (f"; {result.skipped_ties} tied pairs skipped" if result.skipped_ties else ""),
        "",
        "| timesteps | draws | ranking accuracy [95% CI] | reward accuracy [95% CI] |",
        "|---|---:|---|---|",
        f"| all | {result.ranking.draws} | {_fmt(result.ranking)} | {_fmt(result.reward)} |",
    ]
    lines += [f"| [{b.t_low}, {b.t_high}) | {b.ranking.draws} | {_fmt(b.ranking)} | {_fmt(b.reward)} |" for b in result.buckets]
    return "\n".join(lines) + "\n"
