"""The cache's manifest: what a cache must record to serve a config (`expected_identity`), the verification
training runs before reading it (`check_cache`), and the summary written when a build completes.

``manifest.json`` (written last, atomically) holds: ``format_version``; ``fingerprint`` (sha256 of the
identity); ``identity`` (the compared fields, see `diffalign.data.identity`); ``model`` (refs, family,
VAE ref, scaling factor, text encoders, embedding shapes, VAE encode dtype); ``latents`` (dtype,
resolution, latent size, crop, flip, pairing, seed, time-ids policy); ``source`` (description, digest
and how the digest is computed); ``counts`` (items, images, captions, K, ties, skipped, source items,
shards); ``skipped`` (source_id and reason of every skipped item); ``extra_scores`` (names of the scorers
whose raw per-image scores the index holds; the synthetic source's settings and scorers are in
``source.description``) and ``shard_size``. A cache of another ``format_version`` is refused by name.

An evaluation-only cache (``data.source.evaluation_only``: built from held-out captions) has ``"evaluation_only":
true`` in its manifest and ``data.source.evaluation_only`` in its identity (only when true, so the identities of
other caches are unchanged); `check_cache` refuses it to a config that is not evaluation-only, and training refuses it
outright (`refuse_evaluation_only`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow.compute as pc
from safetensors.torch import load_file

from diffalign.config import Config
from diffalign.data.digest import json_digest
from diffalign.data.errors import CacheIncompleteError, CacheMismatchError, DataError
from diffalign.data.identity import FORMAT_VERSION, components_identity, config_identity, diff_identity
from diffalign.data.shards import committed_shards, read_index, shard_meta, tensors_path
from diffalign.data.sources import open_source
from diffalign.models.loading import Components, vae_encode_dtype

MANIFEST = "manifest.json"
BUILD = "build.json"
TEXT_EMPTY = "text_empty.safetensors"


def _source_identity(cfg: Config, source=None, strict: bool = True) -> dict:
    """``data.source.digest`` of the configured source; without a reachable source (strict=False) its description."""
    try:
        source = source or open_source(cfg.data.source, cfg)
    except DataError as e:
        if strict:
            raise
        warnings.warn(f"source not readable ({e}); the cache's source is checked by description only", stacklevel=3)
        return {"data.source.config": cfg.data.source.model_dump(mode="json")}
    return {"data.source.digest": source.digest()}


def expected_identity(cfg: Config, components: Components | None, source=None, strict: bool = True) -> dict:
    """The identity a cache must have to serve `cfg` (component fields only when components are given)."""
    ident = config_identity(cfg)
    if components is not None:
        ident.update(components_identity(components))
    ident.update(_source_identity(cfg, source, strict))
    if evaluation_only(cfg):
        ident["data.source.evaluation_only"] = True
    return ident


def evaluation_only(cfg: Config) -> bool:
    """The config asks for an evaluation-only cache (`data.source.evaluation_only`, synthetic source)."""
    return bool(getattr(cfg.data.source, "evaluation_only", False))


def refuse_evaluation_only(manifest: dict, cache_dir) -> None:
    """Raise `DataError` if the manifest marks an evaluation-only cache: such a cache may never become training data."""
    if manifest.get("evaluation_only"):
        raise DataError(
            f"data.cache_dir: the cache at {cache_dir} is evaluation-only (built with data.source.evaluation_only = true, e.g. "
            "from held-out captions) and may never become training data; evaluate with it (`diffalign eval ranking`) and train "
            "on another data.cache_dir"
        )


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (OSError, ValueError) as e:
        raise CacheIncompleteError(f"{path}: unreadable ({e}); delete the cache directory and prepare it again") from None


# the fields readers take from manifest.json, with their types: checked once when it is read
_MANIFEST_FIELDS = {("identity",): dict, ("fingerprint",): str, ("counts", "shards"): int, ("counts", "items"): int,
                    ("counts", "k"): int, ("counts", "skipped"): int, ("model", "family"): str, ("latents", "resolution"): int,
                    ("skipped",): list}


def read_manifest(root: Path) -> dict:
    """The cache's manifest.json, its fields checked (a damaged one raises `CacheIncompleteError` naming the field)."""
    path = Path(root) / MANIFEST
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        return manifest  # another format: the caller's format check names the version
    for keys, kind in _MANIFEST_FIELDS.items():
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise CacheIncompleteError(f"{path}: damaged ({'.'.join(keys)} is {value!r}, expected a "
                                       f"{'non-negative integer' if kind is int else kind.__name__}); delete the cache "
                                       "directory and prepare it again")
    return manifest


FORMAT_HISTORY = "version 2 added the index column `extra_scores` (raw per-scorer scores)"


def format_error(version, root: Path, what: str) -> CacheMismatchError | None:
    """The error for a cache written in another on-disk format (None when `version` is the current one)."""
    if version == FORMAT_VERSION:
        return None
    return CacheMismatchError(
        f"{what} at {root} is in cache format version {version}, but this diffalign reads version {FORMAT_VERSION} "
        f"({FORMAT_HISTORY}); delete the directory (or choose another data.cache_dir) and run `diffalign prepare` again"
    )


def compare_identity(cached: dict, expected: dict, root: Path, what: str) -> None:
    if "format_version" in expected:
        err = format_error(cached.get("format_version"), root, what)
        if err is not None:
            raise err
    cached = dict(cached)
    if "data.source.config" in expected:  # source unreachable: compare what the manifest recorded of its config
        cached["data.source.config"] = cached.get("_source_config")
    lines = diff_identity(cached, expected)
    if lines:
        raise CacheMismatchError(
            f"{what} at {root} does not match the configuration:\n  " + "\n  ".join(lines) + "\n"
            "Use another data.cache_dir, or delete this one to rebuild it."
        )


def check_cache(cfg: Config, components: Components | None = None) -> dict:
    """Return the manifest of the complete cache at `cfg.data.cache_dir` if it serves `cfg`, else raise.

    Missing or unfinished: `CacheIncompleteError`. Built with other settings: `CacheMismatchError` listing
    every differing field with both values. Component fields (family, VAE, encoders) are compared only
    when `components` is given; the source is compared by content digest (by its config if unreadable).
    """
    root = Path(cfg.data.cache_dir)
    if not (root / MANIFEST).is_file():
        state = "is unfinished (no manifest.json; run prepare again to resume)" if (root / BUILD).is_file() else "does not exist"
        raise CacheIncompleteError(f"data.cache_dir: the latent cache at {root} {state}; run `diffalign prepare` first")
    manifest = read_manifest(root)
    if not evaluation_only(cfg):
        refuse_evaluation_only(manifest, root)
    compare_identity(manifest.get("identity", {}), expected_identity(cfg, components, strict=False), root, "the cache")
    for s in range(manifest["counts"]["shards"]):
        if not tensors_path(root, s).is_file():
            raise CacheIncompleteError(f"{tensors_path(root, s)}: shard file missing; delete {root} and prepare it again")
    return manifest


def build_manifest(cfg: Config, components: Components, root: Path, identity: dict, source) -> dict:
    """Summarise the committed shards (so a resumed build writes the same manifest as an uninterrupted one)."""
    shards = committed_shards(root)
    metas = [shard_meta(root, s) for s in range(shards)]
    index = read_index(root, shards, ["label", "k", "extra_scores"])
    items = index.num_rows
    skipped = [s for m in metas for s in m["skipped"]]
    if items == 0:
        read = sum(m["source_items"] for m in metas)
        reasons = "; ".join(f"{s['source_id']}: {s['reason']}" for s in skipped[:5])
        shown = f" ({reasons})" if reasons else ""
        raise DataError(f"no usable items in data.source ({source.describe()}): {read} read, {len(skipped)} skipped{shown}")
    k = index.column("k")[0].as_py()
    ties = int(pc.sum(pc.equal(index.column("label"), 0.5)).as_py() or 0)
    empty = load_file(str(root / TEXT_EMPTY))
    vae = components.vae.config
    ident = dict(identity)
    ident["_source_config"] = cfg.data.source.model_dump(mode="json")
    return {
        "format_version": identity["format_version"],
        "complete": True,
        "evaluation_only": evaluation_only(cfg),
        "fingerprint": json_digest(identity),
        "identity": ident,
        "model": {
            "pretrained": cfg.model.pretrained,
            "revision": cfg.model.revision,
            "family": components.family,
            "vae": cfg.model.vae or f"{cfg.model.pretrained} (vae subfolder)",
            "scaling_factor": float(vae.scaling_factor),
            "shift_factor": None if vae.get("shift_factor") is None else float(vae.shift_factor),
            "text_encoders": identity.get("model.text_encoders"),
            "prompt_embeds_shape": list(empty["prompt_embeds"].shape),
            "pooled_dim": int(empty["pooled"].shape[-1]) if "pooled" in empty else None,
            "vae_encode_dtype": str(vae_encode_dtype(cfg.model, cfg.train.mixed_precision)).removeprefix("torch."),
        },
        "latents": {
            "dtype": cfg.data.latent_dtype,
            "resolution": cfg.data.resolution,
            "latent_channels": int(vae.latent_channels),
            "latent_size": cfg.data.resolution // components.vae_scale_factor,
            "crop": cfg.data.crop,
            "random_flip": cfg.data.random_flip,
            "pairing": cfg.data.pairing,
            "seed": cfg.data.seed,
            "time_ids": "stored per image: [original_h, original_w, crop_top, crop_left, resolution, resolution] (true size; crop in "
            "the resized, flipped frame); data.time_ids = 'fixed' replaces them with [res, res, 0, 0, res, res] when loading",
        },
        "source": {"description": source.describe(), "digest": identity["data.source.digest"], "digest_method": source.digest_method},
        "counts": {"items": items, "images": items * k, "captions": sum(m["captions"] for m in metas), "k": k, "ties": ties,
                   "skipped": len(skipped), "source_items": sum(m["source_items"] for m in metas), "shards": shards},
        "skipped": skipped,
        "extra_scores": sorted(pc.unique(index.column("extra_scores").combine_chunks().keys).to_pylist()),
        "shard_size": cfg.data.shard_size,
    }


def _read_empty(root: Path) -> dict:
    return load_file(str(root / TEXT_EMPTY))
