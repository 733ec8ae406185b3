"""Build the latent-pair cache (`prepare_cache`); `check_cache` (from `diffalign.data.manifest`) verifies one.

Layout of ``data.cache_dir``::

    build.json                 identity of the build, written first; a resume must match it
    shards/NNNNN.safetensors   VAE posterior mean/logvar (unscaled) + text embeddings of new captions;
                               with data.flip_at = 'train' also mean_mirrored/logvar_mirrored: the posterior of
                               each image's mirror, on the same rows (2x VAE encoding and latent storage)
    shards/NNNNN.parquet       index rows of the shard's items; written last = the shard's commit
    text_empty.safetensors     the "" caption's prompt_embeds (L, D) [+ pooled (D2,)], for caption dropout
    manifest.json              written last, atomically: the cache is complete (`diffalign.data.manifest`)
    scores/<scorer>/...        reward scores of the source images (`data.scores`), added after the manifest by
                               `diffalign.data.scores`; never part of the latents' identity

Shard s always covers source items [s·shard_size, (s+1)·shard_size) and VAE batches never cross a
shard, so a build killed at any point and rerun keeps the committed shards, discards the rest and
ends byte-identical to an uninterrupted build. Captions are embedded once, in the shard where they
first occur. Images decode in a thread pool (`data.decode_workers`) a few items ahead of the VAE.
"""

from __future__ import annotations

import json
import warnings
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.config import Config
from diffalign.data.errors import CorruptImageError, DataError
from diffalign.data.images import PlacedImage, prepare_images
from diffalign.data.manifest import BUILD, MANIFEST, TEXT_EMPTY, build_manifest, check_cache, compare_identity, expected_identity, read_json
from diffalign.data.prefetch import ordered_map
from diffalign.data.scores import score_cache
from diffalign.data.shards import committed_shards, discard_uncommitted, read_index, write_shard
from diffalign.data.sources import SourceItem, open_source
from diffalign.faults import fault_point
from diffalign.io import atomic_write_text, save_safetensors
from diffalign.locks import directory_lock
from diffalign.models.devices import on_device
from diffalign.models.loading import Components, encode_images, encode_prompts, load_components, sdxl_time_ids, vae_encode_dtype
from diffalign.models.quiet import quiet_loading

MAX_SKIP_WARNINGS = 20
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def place_item(data, item: SourceItem) -> list[PlacedImage]:
    """The item's images decoded, resized, cropped and flipped as the cache stores them (`data`: the config's data section)."""
    return prepare_images(item.images, item.source_id, resolution=data.resolution, crop=data.crop, random_flip=data.random_flip,
                          pairing=data.pairing, seed=data.seed, resize=data.resize, flip_at=data.flip_at)


class _Builder:
    """Turns source items into committed shards; restores its state from already-committed shards."""

    def __init__(self, cfg: Config, components: Components, root: Path):
        self.cfg, self.c, self.root = cfg, components, root
        self.dtype = DTYPES[cfg.data.latent_dtype]
        self.res = cfg.data.resolution
        self.start = committed_shards(root)
        discard_uncommitted(root, self.start)
        self.orientations = ("", "_mirrored") if cfg.data.flip_at == "train" else ("",)  # suffixes of the posterior tensors
        self.captions: dict[str, tuple[int, int]] = {}
        self.k: int | None = None
        self.skips = 0
        self.skips_in_a_row = 0  # data.max_consecutive_corrupt
        if self.start:
            index = read_index(root, self.start, ["caption", "text_shard", "text_row", "k"])
            for cap, s, r in zip(*(index.column(n).to_pylist() for n in ("caption", "text_shard", "text_row"))):
                self.captions.setdefault(cap, (s, r))
            if index.num_rows:
                self.k = index.column("k")[0].as_py()

    def _decode(self, pair: tuple[int, SourceItem]) -> list[PlacedImage] | CorruptImageError:
        try:
            return place_item(self.cfg.data, pair[1])
        except CorruptImageError as e:
            return e

    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.c.text_encoders[0].parameters()).device
        embeds, pooled = [], []
        bs = self.cfg.data.encode_batch_size
        for i in range(0, len(captions), bs):
            e, p = encode_prompts(self.c, captions[i : i + bs], device)
            embeds.append(e.to("cpu", self.dtype))
            if p is not None:
                pooled.append(p.to("cpu", self.dtype))
        out = {"prompt_embeds": torch.cat(embeds)}
        if pooled:
            out["pooled"] = torch.cat(pooled)
        return out

    def _open_shard(self, shard: int, first_item: int) -> None:
        self.shard = shard
        self.cur = {"first_item": first_item, "source_items": 0, "rows": [], "skipped": [], "captions": []}
        for suffix in self.orientations:
            self.cur.update({"pending" + suffix: [], "mean" + suffix: [], "logvar" + suffix: []})

    def _flush_pixels(self, everything: bool) -> None:
        """VAE-encode pending images of each orientation in full batches (and the remainder at the shard's end)."""
        cur, bs = self.cur, self.cfg.data.encode_batch_size
        for suffix in self.orientations:
            pending = cur["pending" + suffix]
            while len(pending) >= bs or (everything and pending):
                m, lv = encode_images(self.c.vae, torch.stack(pending[:bs]))
                del pending[:bs]
                cur["mean" + suffix].append(m.to("cpu", self.dtype))
                cur["logvar" + suffix].append(lv.to("cpu", self.dtype))

    def add(self, item_id: int, item: SourceItem, result: list[PlacedImage] | CorruptImageError) -> None:
        """Record one decoded item in the open shard (or skip it, or fail, per `data.corrupt_images`)."""
        cur = self.cur
        cur["source_items"] += 1
        if self.k is None:
            self.k = item.k
        elif item.k != self.k:
            raise DataError(f"{item.source_id}: has {item.k} images but earlier items have {self.k}; K must be the same for every item of a cache")
        if isinstance(result, CorruptImageError):
            if self.cfg.data.corrupt_images == "error":
                raise CorruptImageError(f"{result} (data.corrupt_images = error)", None) from None
            self.skips += 1
            self.skips_in_a_row += 1
            limit = self.cfg.data.max_consecutive_corrupt
            if limit is not None and self.skips_in_a_row > limit:
                raise DataError(f"{self.skips_in_a_row} unreadable items in a row (the last: {item.source_id}: {result.reason}); is "
                                f"data.source right? (data.max_consecutive_corrupt = {limit} sets how many are tolerated)")
            if self.skips <= MAX_SKIP_WARNINGS:
                more = " (further skips are listed in manifest.json only)" if self.skips == MAX_SKIP_WARNINGS else ""
                warnings.warn(f"skipping {item.source_id}: {result.reason}{more}", stacklevel=2)
            cur["skipped"].append({"source_id": item.source_id, "reason": result.reason})
            return
        self.skips_in_a_row = 0
        if item.caption not in self.captions:
            self.captions[item.caption] = (self.shard, len(cur["captions"]))
            cur["captions"].append(item.caption)
        ts, tr = self.captions[item.caption]
        first = len(cur["rows"]) * item.k
        cur["rows"].append(
            dict(item_id=item_id, source_id=item.source_id, caption=item.caption, text_shard=ts, text_row=tr,
                 latent_rows=list(range(first, first + item.k)), k=item.k,
                 time_ids=[sdxl_time_ids(p.original_size, p.crop_top_left, (self.res, self.res)) for p in result],
                 flips=[p.flipped for p in result], label=item.label, ranks=item.ranks, scores=item.scores,
                 extra_scores=item.extra_scores)
        )
        cur["pending"].extend(p.pixels for p in result)
        if "_mirrored" in self.orientations:
            cur["pending_mirrored"].extend(p.mirrored for p in result)
        self._flush_pixels(everything=False)

    def commit(self) -> None:
        """Encode what is left of the open shard, embed its new captions and write it."""
        self._flush_pixels(everything=True)
        cur, tensors = self.cur, {}
        for suffix in self.orientations:
            if cur["mean" + suffix]:
                tensors["mean" + suffix], tensors["logvar" + suffix] = torch.cat(cur["mean" + suffix]), torch.cat(cur["logvar" + suffix])
        if cur["captions"]:
            tensors.update(self._encode_text(cur["captions"]))
        meta = {"shard": self.shard, "first_item": cur["first_item"], "source_items": cur["source_items"],
                "skipped": cur["skipped"], "captions": len(cur["captions"])}
        write_shard(self.root, self.shard, tensors, cur["rows"], meta)

    def run(self, source, progress: bool) -> None:
        d = self.cfg.data
        first = self.start * d.shard_size
        total = source.count()
        if d.max_items is not None:
            total = d.max_items if total is None else min(total, d.max_items)
        stop = d.max_items if d.max_items is not None else None
        stream = ((first + i, item) for i, item in enumerate(source.items(first)))
        if stop is not None:
            stream = islice(stream, max(0, stop - first))
        ahead = max(2 * d.decode_workers, d.encode_batch_size)
        desc = getattr(source, "progress_desc", "caching latents")  # the synthetic source generates per item: its bar says so
        bar = tqdm(total=total, initial=min(first, total or first), unit="item", desc=desc, disable=not progress)
        self.cur = None
        try:
            for (item_id, item), result in ordered_map(self._decode, stream, d.decode_workers, ahead):
                if self.cur is not None and item_id // d.shard_size != self.shard:
                    self.commit()
                    self.cur = None
                if self.cur is None:
                    self._open_shard(item_id // d.shard_size, item_id)
                self.add(item_id, item, result)
                bar.update(1)
            if self.cur is not None:
                self.commit()
        finally:
            bar.close()


def prepare_cache(cfg: Config, components: Components | None = None, progress: bool = True) -> Path:
    """Build (or resume building) the latent-pair cache at `cfg.data.cache_dir` and return its path.

    A complete cache is verified against `cfg` and left alone (`CacheMismatchError` if it differs). An
    unfinished one is resumed when its ``build.json`` matches, refused otherwise. `components` default to
    `load_components(cfg.model)`; either way their VAE and text encoders work on the GPU during the build when
    there is one, and go back where they were afterwards; the VAE encodes in
    `vae_encode_dtype(cfg.model, cfg.train.mixed_precision)`. A synthetic source whose generating model is
    `cfg.model` samples with these components (so they must be the base model, without trained adapters)
    instead of loading a second copy. Then, with `data.scores`, the scorers whose scores are missing or unfinished
    score the source images beside the latents (`diffalign.data.scores.score_cache`; complete ones are verified).
    One process builds or scores a cache at a time: another gets `DirectoryInUseError` naming the one at work.
    """
    root = Path(cfg.data.cache_dir)
    if (root / MANIFEST).is_file():
        score_cache(cfg, check_cache(cfg, components), progress)  # data.scores: scores missing beside the latents, if any
        return root
    if root.exists() and not (root / BUILD).is_file() and any(not p.name.startswith(".") for p in root.iterdir()):
        raise DataError(f"data.cache_dir: {root} exists, is not empty and is not a diffalign cache; choose another directory")
    source = open_source(cfg.data.source, cfg)  # checked (files, held-out captions) before anything is created
    try:
        with directory_lock(root, "data.cache_dir"):  # one builder at a time; the other is told who holds it
            if (root / MANIFEST).is_file():  # finished by another process while this one waited to look
                score_cache(cfg, check_cache(cfg, components), progress)
            else:
                _build(cfg, components, root, progress, source)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return root


def _build(cfg: Config, components: Components | None, root: Path, progress: bool, source) -> None:
    if components is None:
        components = load_components(cfg.model)
    identity = expected_identity(cfg, components, source)
    build = {"identity": identity, "shard_size": cfg.data.shard_size}
    if (root / BUILD).is_file():
        previous = read_json(root / BUILD)
        compare_identity({**previous.get("identity", {}), "data.shard_size": previous.get("shard_size")},
                 {**identity, "data.shard_size": cfg.data.shard_size}, root, "the unfinished cache build")
    else:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / BUILD, json.dumps(build, indent=2, sort_keys=True) + "\n")

    share = getattr(source, "share_components", None)
    if share is not None:
        share(components, cfg.model)
    vae = components.vae
    want = vae_encode_dtype(cfg.model, cfg.train.mixed_precision)
    was = vae.dtype
    encoders = [vae, *components.text_encoders] if torch.cuda.is_available() else []  # lent to the GPU for the build
    with on_device(encoders, "cuda"):
        if want != was:
            with quiet_loading():
                vae.to(dtype=want)
        try:
            _Builder(cfg, components, root).run(source, progress)
            if not (root / TEXT_EMPTY).is_file():
                embeds, pooled = encode_prompts(components, [""], next(components.text_encoders[0].parameters()).device)
                dtype = DTYPES[cfg.data.latent_dtype]
                empty = {"prompt_embeds": embeds[0].to("cpu", dtype)}
                if pooled is not None:
                    empty["pooled"] = pooled[0].to("cpu", dtype)
                save_safetensors(root / TEXT_EMPTY, empty)
        finally:
            if want != was:
                with quiet_loading():
                    vae.to(dtype=was)
    manifest = build_manifest(cfg, components, root, identity, source)
    fault_point("cache.before_manifest")
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    score_cache(cfg, manifest, progress)
