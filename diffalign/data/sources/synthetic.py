"""The synthetic source (`data.source.kind = synthetic`): sample K images per prompt, score them, rank by win-rate.

Recipe (RankDPO's Syn-Pic, arXiv:2410.18013, Algorithm 1; research/step_methods.md §5): for prompt c the
model generates images x^1..x^K; each of n scorers R_r scores every image; the preference score of image i
is its average pairwise win-rate over all scorers,

    φ(x^i) = (1 / (n·(K−1))) · Σ_r Σ_{j≠i} ( [R_r(x^i) > R_r(x^j)] + ½·[R_r(x^i) = R_r(x^j)] ),

so φ ∈ [0, 1] and Σ_i φ(x^i) = K/2 for every prompt (ties count ½ here; the paper's count uses a strict
">" and is silent on ties). The item's `scores` are φ, so the dataset's ranks are the dense ranks of φ; each
scorer's raw per-image scores travel along as `extra_scores`.

Sampling: the model's diffusers pipeline (`build_pipeline`: DDIM, eta 0) draws the K images of a prompt in
one call, each from its own CPU `torch.Generator` seeded by `image_seed(seed, prompt index, k)`, so an
image depends on neither batching nor where a build resumed; `items(start)` begins at prompt `start`
without generating earlier ones. The model and the scorers load once per source object, on first use (on
the GPU when there is one); `share_components` lets the cache builder lend its already loaded model for
the on-policy case instead of loading a second copy. source_id = "synthetic:<prompt index>".

Digest: sha256 of `describe()`: every generation setting, the prompt list (by its sha256), the scorer
names and the generating model's refs and weights digest (`weights_digest(..., generation=True)`,
UNet included). Scorer weights are identified by name only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from diffalign.config import ModelConfig, SyntheticSource
from diffalign.data.digest import json_digest
from diffalign.data.errors import DataError
from diffalign.data.identity import weights_digest
from diffalign.data.sources.base import SourceItem, validate_item
from diffalign.models.sampling import sample_images
from diffalign.scorers.registry import scorer_identity

VERSION = 2  # bump when sampling or scoring changes in a way the settings do not show, so old caches are refused
SEED_METHOD = "torch.Generator().manual_seed(blake2b-64('diffalign-synthetic\\0<seed>\\0<prompt index>\\0<k>') mod 2^63)"
PHI = "phi_i = sum over scorers and j != i of ([s_i > s_j] + 0.5 [s_i = s_j]) / (n_scorers * (K - 1))"
SAMPLER = "DDIM (eta 0) built from the model's scheduler config (diffalign.models.loading.build_pipeline)"
_LOAD_FIELDS = ("pretrained", "revision", "variant", "vae", "prediction_type")


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """Seed of the generator of image `k` of prompt `prompt_index` (a 63-bit hash of all three)."""
    digest = hashlib.blake2b(f"diffalign-synthetic\0{seed}\0{prompt_index}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def win_rate_phi(scores: Mapping[str, Sequence[float]]) -> list[float]:
    """Average pairwise win-rate of each of K images over all scorers (ties count ½); sums to K/2.

    `scores` maps scorer name -> the K images' scores (higher = better).
    ``win_rate_phi({"a": [3, 1, 2]}) == [1.0, 0.0, 0.5]``.
    """
    if not scores:
        raise ValueError("win_rate_phi needs the scores of at least one scorer")
    table = np.array([list(v) for v in scores.values()], dtype=np.float64)  # (n, K)
    if table.ndim != 2 or len({len(v) for v in scores.values()}) != 1:
        raise ValueError(f"every scorer must score the same number of images, got {[len(v) for v in scores.values()]}")
    n, k = table.shape
    if k < 2:
        raise ValueError(f"win rates need at least 2 images, got {k}")
    if not np.isfinite(table).all():
        raise ValueError(f"scores must be finite, got {dict(scores)}")
    a, b = table[:, :, None], table[:, None, :]  # (n, K, 1) vs (n, 1, K)
    wins = (a > b).sum(axis=(0, 2)) + 0.5 * ((a == b).sum(axis=(0, 2)) - n)  # the diagonal ties itself n times
    return (wins / (n * (k - 1))).tolist()


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
        module.to(dtype=torch.float32)
    try:
        yield
    finally:
        if was != torch.float32:
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
        self.prompts = cfg.prompt_list()
        self.k = cfg.images_per_prompt
        self.resolution = cfg.resolution or data_resolution
        self.on_policy = cfg.model is None
        self.model = training_model if cfg.model is None else ModelConfig(pretrained=cfg.model)
        self._description: dict | None = None
        self._components = None
        self._loaded = False
        self._scorers: dict | None = None
        self._restore: list[tuple[torch.nn.Module, torch.device]] = []

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
            for module in (c.unet, c.vae, *c.text_encoders):
                was = next(module.parameters()).device
                if was.type != "cuda":
                    if shared:
                        self._restore.append((module, was))
                    module.to("cuda")
        self._components, self._loaded = c, True
        self._scorers = {name: load_scorer(name, **self.cfg.scorer_options.get(name, {})) for name in self.cfg.scorers}

    def close(self) -> None:
        """Release the pipeline and scorers; modules of shared components go back to their devices."""
        for module, device in self._restore:
            module.to(device)
        self._restore = []
        self._scorers = self._components = None
        self._loaded = False

    # ------------------------------------------------------------------------------------ items

    def generate(self, index: int) -> list:
        """The K PIL images of prompt `index` (one pipeline call, one generator per image)."""
        if not self._loaded:
            self._load()
        c = self.cfg
        with _float32(self._components.vae):
            return sample_images(
                self._components,
                [self.prompts[index]] * self.k,
                [image_seed(c.seed, index, k) for k in range(self.k)],
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                resolution=self.resolution,
                batch_size=self.k,
            )

    def score(self, images: list, caption: str, where: str) -> dict[str, list[float]]:
        """Each scorer's 'overall' score of each image."""
        if self._scorers is None:
            self._load()
        raw = {}
        for name, scorer in self._scorers.items():
            try:
                values = scorer.score(images, [caption] * len(images))["overall"]
            except ValueError as e:
                raise DataError(f"{where}: scorer {name!r} cannot score prompt {caption!r}: {e}") from None
            values = [float(v) for v in torch.as_tensor(values).flatten().tolist()]
            if len(values) != len(images) or not all(np.isfinite(values)):
                raise DataError(f"{where}: scorer {name!r} returned {values!r} for {len(images)} images (expected finite scores)")
            raw[name] = values
        return raw

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for i in range(start, len(self.prompts)):
            sid = f"synthetic:{i}"
            caption = self.prompts[i]
            images = self.generate(i)
            raw = self.score(images, caption, sid)
            item = SourceItem(sid, caption, [_png(im) for im in images], scores=win_rate_phi(raw), extra_scores=raw)
            yield validate_item(item)
