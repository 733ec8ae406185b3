"""What makes a latent cache valid for a config: a flat dict of dotted fields, compared field by field.

The identity holds everything that changes the cached tensors: the format version; the model refs
(pretrained, revision, variant, separate VAE) and a digest of the local weight files the cache depends
on (VAE, text encoders, tokenizers; a single-file checkpoint whole, with its config directory; see
`diffalign.data.digest` for the method; hub ids are identified by id and revision only); with loaded
components, also the family, VAE class / scaling factor / latent channels / spatial factor and the text
encoders' classes and widths; the latent dtype, resolution, resize, crop, flip (and when it is decided:
`flip_at`), pairing and augmentation seed; the source kind and content digest, and `max_items`.
A field added after caches were first written (`ADDED_LATER`)
reads, in a cache that does not record it, as the value every such cache was built with.
Knobs that only change how the cache is read (ties, time_ids, caption_dropout) or how fast it is built
(batch sizes, workers, shard size) are not part of it. Keys are named after the config field to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.config import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, BUILTIN_TOY, Config, ModelConfig
from diffalign.config.base import is_single_file
from diffalign.data.digest import files_digest

FORMAT_VERSION = 2  # 2: the index gained `extra_scores` (raw per-scorer scores); version-1 caches are refused
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_CACHE_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_GENERATION_SUBFOLDERS = _CACHE_SUBFOLDERS + ("unet", "scheduler")
# identity fields newer than format version 2, with the behaviour of the caches written before them
ADDED_LATER = {"data.resize": "bicubic", "data.flip_at": "cache"}


def _dir_digest(root: Path, subfolders: tuple[str, ...] | None) -> str:
    tops = [root / s for s in subfolders] if subfolders else [root]
    files = [p for t in tops if t.is_dir() for p in t.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    return files_digest(files, root)


def weights_digest(model: ModelConfig, generation: bool = False) -> str:
    """Digest of the local files that the cached tensors depend on; 'builtin:...' / 'hub:<id>@<rev>' otherwise.

    `generation`: also the UNet and scheduler, for a model that samples the images (the synthetic source).
    """
    ref = model.pretrained
    if ref == BUILTIN_TOY:  # the shipped weights: a retrain must invalidate caches built from the old ones
        from diffalign.toy.model import WEIGHTS_DIR

        return f"{ref}:{_dir_digest(WEIGHTS_DIR, None)}"
    if ref in (BUILTIN_TINY_SDXL, BUILTIN_TINY_SD15):
        return ref
    parts = []
    if is_single_file(ref):  # the checkpoint file, and the configs and tokenizers it is read with
        parts.append(files_digest([Path(ref)], Path(ref).parent) if Path(ref).is_file() else f"missing:{ref}")
        config = model.single_file_config
        if config is not None:
            parts.append(_dir_digest(Path(config), None) if Path(config).is_dir() else f"hub:{config}")
    elif Path(ref).is_dir():
        sub = tuple(s for s in (_GENERATION_SUBFOLDERS if generation else _CACHE_SUBFOLDERS) if not (model.vae and s == "vae"))
        parts.append(_dir_digest(Path(ref), sub))
    else:
        parts.append(f"hub:{ref}@{model.revision or 'main'}")
    if model.vae:
        parts.append(_dir_digest(Path(model.vae), None) if Path(model.vae).is_dir() else f"hub:{model.vae}@{model.revision or 'main'}")
    return "+".join(parts)


def config_identity(cfg: Config) -> dict[str, Any]:
    """The identity fields readable from the config alone (the source digest is added by the caller)."""
    m, d = cfg.model, cfg.data
    return {
        "format_version": FORMAT_VERSION,
        "model.pretrained": m.pretrained,
        "model.revision": m.revision,
        "model.variant": m.variant,
        "model.vae": m.vae,
        "model.weights": weights_digest(m),
        "data.resolution": d.resolution,
        "data.resize": d.resize,
        "data.crop": d.crop,
        "data.random_flip": d.random_flip,
        "data.flip_at": d.flip_at,
        "data.pairing": d.pairing,
        "data.seed": d.seed,
        "data.latent_dtype": d.latent_dtype,
        "data.max_items": d.max_items,
        "data.source.kind": d.source.kind,
    }


def components_identity(components) -> dict[str, Any]:
    """Identity fields read from loaded `Components` (family, VAE, text encoders)."""
    vae = components.vae.config
    encoders = []
    for enc, tok in zip(components.text_encoders, components.tokenizers):
        c = enc.config
        proj = getattr(c, "projection_dim", None) if hasattr(enc, "text_projection") else None
        encoders.append(f"{type(enc).__name__}(hidden={c.hidden_size}, projection={proj}, max_length={tok.model_max_length})")
    return {
        "model.family": components.family,
        "model.vae_class": type(components.vae).__name__,
        "model.scaling_factor": float(vae.scaling_factor),
        "model.shift_factor": None if vae.get("shift_factor") is None else float(vae.shift_factor),
        "model.latent_channels": int(vae.latent_channels),
        "model.vae_spatial_factor": int(components.vae_scale_factor),
        "model.text_encoders": encoders,
    }


def diff_identity(cached: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per field of `expected` that the cache records differently: 'field: cache has X, config asks Y'
    (a field of `ADDED_LATER` that the cache does not record counts as its old behaviour)."""
    lines = []
    for key, want in expected.items():
        have = cached.get(key, ADDED_LATER.get(key, "<not recorded>"))
        if have != want:
            lines.append(f"{key}: cache has {have!r}, config asks {want!r}")
    return lines
