"""The synthetic source (`data.source.kind = synthetic`): sample K images per prompt, score them, rank by win-rate.

Recipe (RankDPO's Syn-Pic, arXiv:2410.18013, Algorithm 1; research/step_methods.md §5): for prompt c the
model generates images x^1..x^K; each of n scorers R_r scores every image; the preference score of image i
is its average pairwise win-rate over all scorers,

    φ(x^i) = (1 / (n·(K−1))) · Σ_r Σ_{j≠i} ( [R_r(x^i) > R_r(x^j)] + ½·[R_r(x^i) = R_r(x^j)] ),

so φ ∈ [0, 1] and Σ_i φ(x^i) = K/2 for every prompt (ties count ½ here; the paper's count uses a strict
">" and is silent on ties). The item's `scores` are φ, so the dataset's ranks are the dense ranks of φ; each
scorer's raw per-image scores travel along as `extra_scores`.

Sampling: the model's diffusers pipeline (`build_pipeline`: DDIM, eta 0) draws every image from its own CPU
`torch.Generator` seeded by `image_seed(seed, prompt index, k)`. Prompts are sampled in fixed windows of
P = `prompts_per_call(K)` prompts ([0, P), [P, 2P), ...; at most IMAGES_PER_CALL images), a window's images in
one pipeline call and its scores in one call per scorer. A window is always the same batch, so an image and
its scores depend on their window only, never on where a build started or resumed: `items(start)` yields
from prompt `start` on, in order (a start inside a window samples the whole window; with power-of-two shards
it never happens). The window size is no setting, yet it shows in the bits: batched kernels round differently
at other batch sizes (the toy model on CPU moves some pixels by one level between one prompt and 16 prompts
per call; benchmarks/synthetic_throughput.py counts them), so changing IMAGES_PER_CALL must bump VERSION.
The model and the scorers load once per source object, on first use (on the GPU when there is one);
`share_components` lets the cache builder lend its already loaded model for the on-policy case instead of
loading a second copy. source_id = "synthetic:<prompt index>".

Digest: sha256 of `describe()`: every generation setting, the prompt list (by its sha256), the scorer
names and the generating model's refs and weights digest (`weights_digest(..., generation=True)`,
UNet included). Scorer weights are identified by name only.

Held-out captions (`diffalign.toy.scenes.HELD_OUT`, the prompt set 'toy-held-out') never become training data: they
are refused unless `evaluation_only` is set, which makes an evaluation-only cache (`describe()` then says so, so
its digest differs from any training cache's; the manifest is marked and training refuses it,
`diffalign.data.manifest.refuse_evaluation_only`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from diffalign.config import PROMPT_SETS, ConfigError, ModelConfig, SyntheticSource
from diffalign.data.digest import json_digest
from diffalign.data.errors import DataError
from diffalign.data.identity import weights_digest
from diffalign.data.sources.base import SourceItem, validate_item
from diffalign.models.devices import Moves
from diffalign.models.quiet import quiet_loading
from diffalign.models.sampling import sample_images
from diffalign.randomness import seed63
from diffalign.rewards import win_rate_phi
from diffalign.scorers.registry import scorer_identity

VERSION = 3  # bump when sampling or scoring changes in a way the settings do not show, so old caches are refused
# (3: prompts sampled IMAGES_PER_CALL images at a time, which rounds differently from 2's one prompt per call)
IMAGES_PER_CALL = 64  # most images per pipeline call (whole prompts, at least one); changing it changes images: bump VERSION
SEED_METHOD = "torch.Generator().manual_seed(blake2b-64('diffalign-synthetic\\0<seed>\\0<prompt index>\\0<k>') mod 2^63)"
PHI = "phi_i = sum over scorers and j != i of ([s_i > s_j] + 0.5 [s_i = s_j]) / (n_scorers * (K - 1))"
SAMPLER = "DDIM (eta 0) built from the model's scheduler config (diffalign.models.loading.build_pipeline)"
_LOAD_FIELDS = ("pretrained", "revision", "variant", "vae", "prediction_type")


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """Seed of the generator of image `k` of prompt `prompt_index` (a 63-bit hash of all three)."""
    return seed63(f"diffalign-synthetic\0{seed}\0{prompt_index}\0{k}")


def builtin_prompts(name: str) -> list[str]:
    """The captions of a built-in prompt set (`diffalign.config.PROMPT_SETS`, or `EVAL_ONLY_PROMPT_SETS`)."""
    from diffalign.data.sources.prompts import builtin_prompt_set

    if name not in ("toy-train", "toy-held-out"):
        raise ConfigError(f"data.source.prompts: unknown prompt set {name!r}; built-in sets: {', '.join(PROMPT_SETS)}")
    return builtin_prompt_set(name)


def resolve_prompts(cfg: SyntheticSource) -> list[str]:
    """The source's prompts, capped at `num_prompts`; held-out evaluation captions are refused as training data
    (allowed with `evaluation_only`, whose cache training refuses)."""
    from diffalign.toy.scenes import HELD_OUT

    prompts = builtin_prompts(cfg.prompts) if isinstance(cfg.prompts, str) else list(cfg.prompts)
    held = {spec.caption for spec in HELD_OUT}
    leaked = [p for p in prompts if p.strip().lower() in held]
    if leaked and not cfg.evaluation_only:
        raise ConfigError(
            f"data.source.prompts: {len(leaked)} prompt(s) are held-out evaluation captions (e.g. {leaked[0]!r}); held-out captions "
            "are for evaluation only and may never become preference data (data.source.evaluation_only = true builds a cache "
            "that only evaluation may read)"
        )
    return prompts[: cfg.num_prompts] if cfg.num_prompts is not None else prompts


def check_scorers(names: Sequence[str]) -> None:
    """Every scorer name is registered (`diffalign.scorers.available()`), else a `ConfigError` listing the names."""
    from diffalign.scorers.registry import available

    known = available()
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ConfigError(f"data.source.scorers: unknown scorer(s) {', '.join(map(repr, unknown))}; available: {', '.join(known)}")


def prompts_per_call(k: int) -> int:
    """Prompts sampled per pipeline call: the largest power of two whose K images fit in IMAGES_PER_CALL (at least 1).

    A power of two, so that windows tile shards of a power-of-two size (data.shard_size, default 256): a resumed
    build then starts on a window boundary and samples nothing twice."""
    p = 1
    while 2 * p * k <= IMAGES_PER_CALL:
        p *= 2
    return p


@dataclass
class _Window:
    """One pipeline call's prompts, their images (K per prompt) and, once asked for, their scores."""

    prompts: range
    k: int
    images: list[list]
    raws: list[dict[str, list[float]]] | None = None


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _same_model(a: ModelConfig, b: ModelConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _LOAD_FIELDS)


@contextlib.contextmanager
def _float32(module: torch.nn.Module):
    """Run `module` in float32 (the cache builder may hold an fp16-safe VAE in half precision)."""
    was = next(module.parameters()).dtype
    if was != torch.float32:
        with quiet_loading():
            module.to(dtype=torch.float32)
    try:
        yield
    finally:
        if was != torch.float32:
            with quiet_loading():
                module.to(dtype=was)


class SyntheticGenerator:
    """Generates, scores and yields one `SourceItem` per prompt (see the module docstring)."""

    progress_desc = "generating, scoring and caching"
    digest_method = (
        "sha256 of the generation settings, the prompt list's sha256, the scorers' identities (config, thresholds) and the "
        "generating model's refs and weights digest (UNet included)"
    )

    def __init__(self, cfg: SyntheticSource, training_model: ModelConfig, data_resolution: int):
        self.cfg = cfg
        self.prompts = resolve_prompts(cfg)
        check_scorers(cfg.scorers)
        self.k = cfg.images_per_prompt
        self.resolution = cfg.resolution or data_resolution
        self.on_policy = cfg.model is None
        self.model = training_model if cfg.model is None else ModelConfig(pretrained=cfg.model)
        self._description: dict | None = None
        self._components = None
        self._loaded = False
        self._scorers: dict | None = None
        self._lent = Moves()  # modules of lent components moved to the GPU, given back on close()
        self.prompts_per_call = prompts_per_call(self.k)
        self._last: _Window | None = None  # the window sampled last

    # ------------------------------------------------------------------------------------ identity

    def count(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict:
        if self._description is None:
            c = self.cfg
            m = self.model
            self._description = {
                "kind": "synthetic",
                "version": VERSION,
                "prompts": c.prompts if isinstance(c.prompts, str) else f"<list of {len(c.prompts)} captions>",
                "num_prompts": len(self.prompts),
                "prompts_sha256": json_digest(self.prompts),
                "images_per_prompt": self.k,
                "scorers": list(c.scorers),
                "scorer_identities": json_digest([scorer_identity(name, **c.scorer_options.get(name, {})) for name in c.scorers]),
                "score": PHI,
                "num_inference_steps": c.num_inference_steps,
                "guidance_scale": c.guidance_scale,
                "seed": c.seed,
                "seed_method": SEED_METHOD,
                "resolution": self.resolution,
                "sampler": SAMPLER,
                "model": {
                    "on_policy": self.on_policy,
                    **{f: getattr(m, f) for f in _LOAD_FIELDS},
                    "weights": weights_digest(m, generation=True),
                },
            }
            if c.evaluation_only:  # recorded only when set, so the digests of training caches stay as they were
                self._description["evaluation_only"] = True
        return self._description

    def digest(self) -> str:
        return json_digest(self.describe())

    # ------------------------------------------------------------------------------------ loading

    def share_components(self, components, model: ModelConfig) -> bool:
        """Sample with `components` (already loaded for `model`) when they are this source's model; True if used.

        They must be the base model (no trained adapters). Modules moved to the GPU go back on `close()`.
        """
        if self._loaded or self._components is not None or not _same_model(self.model, model):
            return False
        self._components = components
        return True

    def _load(self) -> None:
        from diffalign.models.loading import load_components
        from diffalign.scorers.registry import load_scorer

        shared = self._components is not None
        c = self._components if shared else load_components(self.model)
        if self.resolution % c.vae_scale_factor:
            raise DataError(
                f"data.source.resolution: {self.resolution} px is not divisible by the VAE's spatial factor {c.vae_scale_factor} "
                f"of {self.model.pretrained}"
            )
        if torch.cuda.is_available():
            moves = Moves().move((c.unet, c.vae, *c.text_encoders), "cuda")
            if shared:  # our own copy is simply dropped on close()
                self._lent = moves
        self._components, self._loaded = c, True
        self._scorers = {name: load_scorer(name, **self.cfg.scorer_options.get(name, {})) for name in self.cfg.scorers}

    def close(self) -> None:
        """Release the pipeline and scorers; modules of shared components go back to their devices."""
        self._lent.undo()
        self._last = None
        self._scorers = self._components = None
        self._loaded = False

    # ------------------------------------------------------------------------------------ items

    def window(self, index: int) -> range:
        """The prompts sampled in one pipeline call with prompt `index`: the fixed window holding it (module docstring)."""
        first = index - index % self.prompts_per_call
        return range(first, min(first + self.prompts_per_call, len(self.prompts)))

    def _window_of(self, index: int) -> _Window:
        """Prompt `index`'s window, sampled in one pipeline call unless it is the window sampled last."""
        prompts = self.window(index)
        last = self._last
        if last is None or last.prompts != prompts or last.k != self.k:
            images = self._sample(prompts)
            self._last = last = _Window(prompts, self.k, [images[n * self.k : (n + 1) * self.k] for n in range(len(prompts))])
        return last

    def _sample(self, prompts: range) -> list:
        """The K images of each of `prompts` (indices), prompt after prompt, in one pipeline call."""
        if not self._loaded:
            self._load()
        c = self.cfg
        with _float32(self._components.vae):
            return sample_images(
                self._components,
                [self.prompts[i] for i in prompts for _ in range(self.k)],
                [image_seed(c.seed, i, k) for i in prompts for k in range(self.k)],
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                resolution=self.resolution,
                batch_size=len(prompts) * self.k,
            )

    def generate(self, index: int) -> list:
        """The K PIL images of prompt `index` (the first call for a prompt of a window samples the whole window)."""
        window = self._window_of(index)
        return window.images[index - window.prompts.start]

    def score(self, index: int) -> dict[str, list[float]]:
        """Each scorer's 'overall' score of each image of prompt `index` (the first call for a prompt of a window
        scores the whole window, one call per scorer)."""
        window = self._window_of(index)
        if window.raws is None:
            sids = [f"synthetic:{i}" for i in window.prompts]
            window.raws = self._score(window.images, [self.prompts[i] for i in window.prompts], sids)
        return window.raws[index - window.prompts.start]

    def _score(self, images: Sequence[list], captions: Sequence[str], where: Sequence[str]) -> list[dict[str, list[float]]]:
        """Per item (its images, caption and source id): each scorer's 'overall' score of each image.

        Each scorer scores all the items' images in one call; one that refuses them (or miscounts) is asked item
        by item, so that the error names the item it cannot score."""
        if self._scorers is None:
            self._load()
        raws: list[dict[str, list[float]]] = [{} for _ in images]
        flat = [im for group in images for im in group]
        prompts = [caption for group, caption in zip(images, captions) for _ in group]
        for name, scorer in self._scorers.items():
            try:
                values = _overall(scorer, flat, prompts)
            except ValueError:
                values = None
            if values is None or len(values) != len(flat):
                values = []
                for group, caption, sid in zip(images, captions, where):
                    try:
                        scored = _overall(scorer, group, [caption] * len(group))
                    except ValueError as e:
                        raise DataError(f"{sid}: scorer {name!r} cannot score prompt {caption!r}: {e}") from None
                    if len(scored) != len(group):
                        raise DataError(f"{sid}: scorer {name!r} returned {scored!r} for {len(group)} images (expected finite scores)")
                    values += scored
            first = 0
            for raw, group, sid in zip(raws, images, where):
                raw[name] = values[first : first + len(group)]
                first += len(group)
                if not all(np.isfinite(raw[name])):
                    raise DataError(f"{sid}: scorer {name!r} returned {raw[name]!r} for {len(group)} images (expected finite scores)")
        return raws

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        """One item per prompt from prompt `start` on, in order (a window is sampled and scored when the first of its
        prompts is asked for)."""
        for i in range(start, len(self.prompts)):
            sid = f"synthetic:{i}"
            caption = self.prompts[i]
            images = self.generate(i)
            raw = self.score(i)
            item = SourceItem(sid, caption, [_png(im) for im in images], scores=win_rate_phi(raw), extra_scores=raw)
            yield validate_item(item)


def _overall(scorer, images: list, prompts: list[str]) -> list[float]:
    """The scorer's 'overall' scores as floats."""
    return [float(v) for v in torch.as_tensor(scorer.score(images, prompts)["overall"]).flatten().tolist()]
