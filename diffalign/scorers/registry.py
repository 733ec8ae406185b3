"""Scorers by canonical name: a plain table from name to builder and its weight files (no plugin system).

`load_scorer(name, **options)` builds one. Weight options (``path``, and for some scorers a tokenizer or a
backbone folder) are local paths in the official formats; an option left out is looked up in the weights
folder (``weights_dir=`` or the ``DIFFALIGN_WEIGHTS`` environment variable) under the file name the
official release uses, e.g. ``$DIFFALIGN_WEIGHTS/HPS_v2.1_compressed.pt``. Builders import their heavy
dependencies lazily. `scorer_identity` says what decides a scorer's scores without loading it, so caches of
scored data can refuse a changed scorer.

`toy-checklist` is built by the toy world (`diffalign.toy.checklist`: its measuring backend plugs into
`scorers.checklist`). This table is the one place that names every canonical scorer, so it imports that builder
with ordinary import statements inside `_toy_checklist` / `_toy_checklist_identity` (lazily: toy imports scorers at
module level), which readers, grep and the import-cycle check all see, rather than by a "module:callable" string.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

from diffalign.scorers.base import Scorer, ScorerConfigError

WEIGHTS_ENV = "DIFFALIGN_WEIGHTS"


def _callable(target: str | Callable) -> Callable:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


def _toy_checklist(**options) -> Scorer:
    """`toy-checklist`, built by the toy world (see the module docstring)."""
    from diffalign.toy.checklist import toy_checklist_scorer

    return toy_checklist_scorer(**options)


def _toy_checklist_identity(**options) -> dict:
    from diffalign.toy.checklist import toy_checklist_identity

    return toy_checklist_identity(**options)


@dataclass(frozen=True)
class Entry:
    target: str | Callable[..., Scorer]  # the builder, or "module:callable" imported when first used
    weights: dict[str, str] = field(default_factory=dict)  # option -> file or folder name in the weights folder
    optional: tuple[str, ...] = ()  # weight options that may stay unset (the builder has a fallback)
    fixed: dict = field(default_factory=dict)  # options this name implies
    what: str = ""
    identity: str | Callable[..., dict] | None = None  # for scorers without weight files: what decides their scores
    uses_prompt: bool = True  # False: the score ignores the prompt, so images without prompts can be scored


def _hps_resize(name: str) -> str:
    """The HPS entries' note on the letterbox resize (docs/scorers.md, HPSv2 letterbox antialiasing)."""
    return (f"; letterbox resize without antialiasing, as the release-era install (torchvision < 0.17); --scorer-option "
            f"{name}.antialias=true matches a fresh official install (measured against the official hpsv2 package on random "
            "full-size weights: up to 13% of the score spread)")


REGISTRY: dict[str, Entry] = {
    "hpsv2": Entry("diffalign.scorers.hps:HPSv2", {"path": "HPS_v2_compressed.pt"}, fixed={"version": "hpsv2"},
                   what="HPSv2.0, open_clip ViT-H-14, cosine (x100 in the HPSv2 benchmark)" + _hps_resize("hpsv2")),
    "hpsv21": Entry("diffalign.scorers.hps:HPSv2", {"path": "HPS_v2.1_compressed.pt"}, fixed={"version": "hpsv21"},
                    what="HPSv2.1, open_clip ViT-H-14, cosine; not comparable with v2.0" + _hps_resize("hpsv21")),
    "pickscore": Entry("diffalign.scorers.pickscore:PickScore", {"path": "PickScore_v1", "tokenizer": "CLIP-ViT-H-14-laion2B-s32B-b79K"},
                       optional=("tokenizer",), what="PickScore v1, transformers CLIP-H, logit_scale x cosine"),
    "imagereward": Entry("diffalign.scorers.imagereward:ImageReward", {"path": "ImageReward/ImageReward.pt"},
                         what="ImageReward v1.0, BLIP + MLP, z-scored"),
    "mps": Entry("diffalign.scorers.mps:MPS", {"path": "MPS_overall_checkpoint.pth", "clip_config": "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                               "tokenizer": "CLIP-ViT-H-14-laion2B-s32B-b79K"}, optional=("clip_config", "tokenizer"),
                 what="MPS overall checkpoint, CLIP-H + condition cross model; overall and condition-mask dimensions"),
    "aesthetic": Entry("diffalign.scorers.aesthetic:AestheticScorer",
                       {"path": "sac+logos+ava1-l14-linearMSE.pth", "clip": "clip-vit-large-patch14"},
                       what="LAION improved aesthetic predictor, MLP on CLIP ViT-L/14 embeddings, about 1-10", uses_prompt=False),
    "clipscore": Entry("diffalign.scorers.clipscore:CLIPScore", {"path": "clip-vit-base-patch32"},
                       what="CLIPScore, 2.5 max(cos, 0) with 'A photo depicts' (Hessel et al.) unless convention= says otherwise"),
    "hpsv3": Entry("diffalign.scorers.hpsv3:HPSv3", {"path": "HPSv3.safetensors", "base": "Qwen2-VL-7B-Instruct"}, optional=("base",),
                   what="HPSv3, Qwen2-VL-7B + reward head: mu (overall) and log sigma"),
    "visionreward": Entry("diffalign.scorers.visionreward:visionreward_scorer", {"model_path": "visionreward-vlm"},
                          what="VisionReward-style checklist: the official 30 questions and weights over a VLM backend"),
    "toy-checklist": Entry(_toy_checklist, identity=_toy_checklist_identity, what="the toy world's measured checklist (no weights)"),
}


def available() -> list[str]:
    """The canonical scorer names."""
    return sorted(REGISTRY)


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise ScorerConfigError(f"unknown scorer {name!r}; available: {', '.join(available())}")
    return REGISTRY[name]


def uses_prompts(names) -> bool:
    """Whether any of the scorers ``names`` reads the prompt (known without loading them)."""
    return any(_entry(name).uses_prompt for name in names)


def resolve_options(name: str, weights_dir: str | os.PathLike | None = None, **options) -> dict:
    """The scorer's options with every weight file filled in from the weights folder where not given."""
    entry = _entry(name)
    folder = weights_dir or os.environ.get(WEIGHTS_ENV)
    resolved = {**options, **entry.fixed}
    for option, default in entry.weights.items():
        if resolved.get(option) is not None:
            continue
        candidate = Path(folder) / default if folder else None
        if candidate is not None and candidate.exists():
            resolved[option] = str(candidate)
        elif option not in entry.optional:
            where = f"{candidate} does not exist" if candidate else f"no weights folder ({WEIGHTS_ENV} is unset)"
            raise ScorerConfigError(f"scorer {name!r} needs {option}=PATH (e.g. --scorer-option {name}.{option}=PATH), "
                                    f"or a weights folder holding {default!r}: {where}")
    return resolved


def load_scorer(name: str, weights_dir: str | os.PathLike | None = None, **options) -> Scorer:
    """Build the scorer ``name`` (`available()`), weight files from ``options`` or the weights folder."""
    entry = _entry(name)
    return _callable(entry.target)(**resolve_options(name, weights_dir, **options))


def scorer_identity(name: str, weights_dir: str | os.PathLike | None = None, **options) -> dict:
    """What decides a scorer's scores (its options and a fingerprint of each weight file), without loading
    its model: caches of scored data record it, so a changed scorer invalidates them."""
    from diffalign.scorers.weights import fingerprint

    entry = _entry(name)
    if entry.identity is not None:
        return {"name": name, **_callable(entry.identity)(**options)}
    resolved = resolve_options(name, weights_dir, **options)
    identity = {"name": name, **{k: v for k, v in resolved.items() if k not in entry.weights and k not in ("device", "batch_size")}}
    identity["weights"] = {k: fingerprint(resolved[k]) for k in entry.weights if resolved.get(k) is not None}
    return {k: str(v) if not isinstance(v, (int, float, bool, str, dict, list, type(None))) else v for k, v in identity.items()}


def load_scorers(names, options: dict[str, dict] | None = None, weights_dir: str | os.PathLike | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32) -> dict[str, Scorer]:
    """Several scorers by name; ``device``, ``dtype`` and ``batch_size`` go to the ones that run a model."""
    import torch

    if len(set(names)) != len(names):
        raise ScorerConfigError(f"each scorer may be listed once: {', '.join(names)}")
    if not names:
        raise ScorerConfigError("no scorers given")
    model_options = {"device": device, "dtype": getattr(torch, dtype), "batch_size": batch_size}
    options = options or {}
    return {name: load_scorer(name, weights_dir, **({**model_options, **options.get(name, {})} if _entry(name).weights
                                                  else options.get(name, {})))
            for name in names}
