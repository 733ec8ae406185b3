"""`LatentPairDataset`: items of a complete latent cache as dicts of tensors, ready for `default_collate`.

Item ``i`` gives:
- ``item_id`` int64 scalar: the item's position in the source stream (stable; trainers seed draws with it);
- ``mean``, ``logvar`` (K, C, h, w) float32: the unscaled VAE posterior of the K images;
- only with ``data.flip_at = 'train'``: ``mean_mirrored``, ``logvar_mirrored`` (K, C, h, w) float32, the posterior
  of each image's mirror, and ``flip_group`` (K,) int64, which images share one orientation draw at train time
  (all 0 under ``data.pairing = 'shared'``, 0..K-1 under ``'per_image'``; `diffalign.trainers.batch` draws);
- ``prompt_embeds`` (L, D) float32, and ``pooled`` (D2,) for SDXL;
- ``time_ids`` (K, 6) float32: [orig_h, orig_w, crop_top, crop_left, res, res] (``data.time_ids = 'true'``)
  or [res, res, 0, 0, res, res] for every image (``'fixed'``, the official behaviour);
- ``label`` float32: the item's own label, P(images[0] preferred) (soft values kept), NaN when it has none;
- ``ranks`` (K,) int64, 0 = best, and ``pair`` (2,) int64 with ``pair_label`` float32: the item's ranks and
  the (winner slot, loser slot, P(winner preferred)) a pairwise method trains on, both decided in one place
  (`diffalign.data.pairing`);
- ``scores`` (K,) float32, NaN when absent; for a synthetic cache, the Syn-Pic φ recomputed from the raw
  per-scorer scores with ``data.phi_ties`` ('half' reproduces the stored φ; 'strict' counts strict wins); with
  ``data.reward_scorer``, that scorer's 'overall' scores instead (ranks and the trained pair stay the source's);
- ``extra_scores`` {scorer: (K,) float32}: each scorer's raw scores (NaN where an item has none): a synthetic
  source's own, and the 'overall' scores of every scorer of ``data.scores`` (`diffalign.data.scores`, verified
  against the config's scorer identity when the dataset is opened).
``dataset.extra_scores[name]`` is the same as an (len, K) float32 array aligned with the items.
Items whose trained pair is tied (label 0.5, or best and worst equal) are dropped unless ``data.ties = 'keep'``;
with ``data.min_score_gap > 0`` so are items whose pair differs by less than that in raw score (`score_gaps`). Shards are opened lazily with
``safetensors.safe_open`` and the handles kept per process (at most `MAX_OPEN_SHARDS`, reopened after a
fork, never pickled), so the dataset works in DataLoader workers. Caption dropout and posterior sampling belong to the trainer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from diffalign.config import DataConfig
from diffalign.data.errors import CacheIncompleteError, CacheMismatchError, DataError
from diffalign.data.identity import diff_identity
from diffalign.data.manifest import MANIFEST, TEXT_EMPTY, format_error, read_manifest
from diffalign.data.pairing import item_ranks, trained_pairs
from diffalign.data.scores import load_scores
from diffalign.data.shards import fixed_lists, read_index, tensors_path
from diffalign.rewards import phi

MAX_OPEN_SHARDS = 256  # per process; least recently used handles are closed beyond this
_CHECKED = ("data.resolution", "data.resize", "data.crop", "data.random_flip", "data.flip_at", "data.pairing", "data.seed",
            "data.latent_dtype", "data.max_items")


@contextlib.contextmanager
def damaged_cache(root: Path):
    """Any failure to parse the cache's own files (a damaged manifest, index or shard) as a `DataError` naming the cache."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, RuntimeError, pa.ArrowException, SafetensorError) as e:
        raise DataError(f"{root}: the cache is damaged ({type(e).__name__}: {e}); rebuild it (delete the folder and run "
                        "`diffalign prepare` again)") from None


class LatentPairDataset(torch.utils.data.Dataset):
    """The items of the cache at `cache_dir`, read as `data_cfg` asks (ties, time_ids)."""

    def __init__(self, cache_dir: str | Path, data_cfg: DataConfig, manifest: dict | None = None):
        """`manifest`: the cache's manifest when the caller has read (and verified) it already."""
        self.root = Path(cache_dir)
        with damaged_cache(self.root):
            self._open(data_cfg, manifest)

    def _open(self, data_cfg: DataConfig, manifest: dict | None) -> None:
        if manifest is None:
            manifest_path = self.root / MANIFEST
            if not manifest_path.is_file():
                raise CacheIncompleteError(f"{self.root}: no complete latent cache here (manifest.json missing); run `diffalign prepare` first")
            manifest = read_manifest(self.root)
        self.manifest = manifest
        err = format_error(self.manifest.get("format_version"), self.root, "the cache")
        if err is not None:
            raise err
        ident = self.manifest["identity"]
        wanted = {k: getattr(data_cfg, k.split(".", 1)[1]) for k in _CHECKED}
        diffs = diff_identity(ident, wanted)
        if diffs:
            raise CacheMismatchError(f"the cache at {self.root} does not match data config:\n  " + "\n  ".join(diffs))
        self.family = self.manifest["model"]["family"]
        self.resolution = int(self.manifest["latents"]["resolution"])
        self.k = int(self.manifest["counts"]["k"])
        self.time_ids_policy = data_cfg.time_ids
        self.mirrored = data_cfg.flip_at == "train"  # the cache holds both orientations (checked against its identity above)
        self.flip_group = torch.zeros(self.k, dtype=torch.int64) if data_cfg.pairing == "shared" else torch.arange(self.k)
        self._load_index(int(self.manifest["counts"]["shards"]), data_cfg)
        empty = load_file(str(self.root / TEXT_EMPTY))
        self.empty_prompt_embeds = empty["prompt_embeds"].float()
        self.empty_pooled = empty["pooled"].float() if "pooled" in empty else None
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def _load_index(self, shards: int, data_cfg: DataConfig) -> None:
        t = read_index(
            self.root, shards, ["item_id", "text_shard", "text_row", "latent_rows", "time_ids", "label", "ranks", "scores", "extra_scores"]
        )
        k = self.k
        label = t.column("label").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
        rows = fixed_lists(t.column("latent_rows"), k, np.int64, -1)
        if not (rows == rows[:, :1] + np.arange(k)).all():
            raise DataError(f"{self.root}: an item's latents are not on consecutive rows; the cache is damaged, prepare it again")
        tids = t.column("time_ids").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
        self._item_id = t.column("item_id").to_numpy()
        self._shard = t.column("shard").to_numpy()
        self._row = rows[:, 0]
        self._text = np.stack([t.column("text_shard").to_numpy(), t.column("text_row").to_numpy()], 1)
        self._time_ids = tids.reshape(-1, k, 6).astype(np.float32)
        self._label = label.astype(np.float32)
        extra = t.column("extra_scores").combine_chunks()
        raw = {name: fixed_lists(pa.chunked_array([pc.map_lookup(extra, pa.scalar(name), "first")]), k, np.float64, np.nan)
               for name in sorted(pc.unique(extra.keys).to_pylist())}
        self.extra_scores: dict[str, np.ndarray] = {name: v.astype(np.float32) for name, v in raw.items()}
        scores = fixed_lists(t.column("scores"), k, np.float64, np.nan)
        if self.manifest["source"]["description"].get("kind") == "synthetic" and raw:  # φ from the raw scores, as data.phi_ties asks
            scores = phi(np.stack(list(raw.values())), ties=data_cfg.phi_ties)
        self._scores = scores.astype(np.float32)
        self._ranks = item_ranks(label, fixed_lists(t.column("ranks"), k, np.int64, -1), scores)
        winner, loser, self._pair_label = trained_pairs(label, self._ranks)
        self._pair = np.stack([winner, loser], axis=1)
        self._source_scorers = list(raw)  # the source's own per-scorer scores: what min_score_gap measures
        rows_per_shard = np.bincount(self._shard, minlength=shards)
        self.extra_scores.update(load_scores(self.root, self.manifest, data_cfg.scores, data_cfg.score_options, rows_per_shard))
        if data_cfg.reward_scorer is not None:  # the reward of methods that need one; the trained pair stays the source's
            if data_cfg.reward_scorer not in self.extra_scores:
                have = ", ".join(self.extra_scores) or "none"
                raise DataError(f"data.reward_scorer: the cache at {self.root} has no scores of {data_cfg.reward_scorer!r} (it has: {have})")
            self._scores = self.extra_scores[data_cfg.reward_scorer].copy()
        keep = np.ones(len(label), dtype=bool) if data_cfg.ties == "keep" or k == 1 else self._pair_label != 0.5  # K = 1: no pairs
        if k == 1 and data_cfg.min_score_gap > 0:
            raise DataError(f"data.min_score_gap: the cache at {self.root} holds single captioned images, without scores to measure a gap with")
        if data_cfg.min_score_gap > 0:
            gaps = self.score_gaps()
            if np.isnan(gaps).any():
                i = int(np.flatnonzero(np.isnan(gaps))[0])
                raise DataError(f"data.min_score_gap: item {int(self._item_id[i])} of the cache at {self.root} has no scores to measure a gap with")
            keep &= gaps >= data_cfg.min_score_gap
        for name in ("_item_id", "_shard", "_row", "_text", "_time_ids", "_label", "_ranks", "_scores", "_pair", "_pair_label"):
            setattr(self, name, getattr(self, name)[keep])
        self.extra_scores = {name: v[keep] for name, v in self.extra_scores.items()}

    def score_gaps(self) -> np.ndarray:
        """(len,) raw score of each item's trained winner minus its loser, averaged over the source's own scorers (synthetic);
        the item's `scores` (the `data.reward_scorer`'s when set) when the source has no per-scorer scores; NaN when it has neither."""
        rows, (winner, loser) = np.arange(len(self._pair)), self._pair.T
        tables = [self.extra_scores[name] for name in self._source_scorers] or [self._scores]
        gaps = np.stack([t[rows, winner] - t[rows, loser] for t in tables])  # (scorers, n)
        return gaps.mean(axis=0)

    def score_table(self, scorer: str | None = None) -> np.ndarray:
        """(len, K) float32: one scorer's raw per-image scores, or the items' `scores` (φ for a synthetic cache) when None."""
        if scorer is None:
            return self._scores
        if scorer not in self.extra_scores:
            have = ", ".join(self.extra_scores) or "none"
            raise DataError(f"the cache at {self.root} has no per-scorer scores of {scorer!r} (it has: {have})")
        return self.extra_scores[scorer]

    def __len__(self) -> int:
        return len(self._item_id)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked into a worker: handles are per process
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.pop(shard, None)
        if f is None:
            path = tensors_path(self.root, shard)
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' own error types; re-raised naming the file
                raise DataError(f"{path}: cannot read this cache shard ({type(e).__name__}: {e}); the cache is damaged, "
                                f"rebuild it (delete {self.root} and run `diffalign prepare` again)") from None
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles)))  # least recently used
        self._handles[shard] = f
        return f

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        with damaged_cache(self.root):
            return self._item(int(i) % len(self))

    def _item(self, i: int) -> dict[str, torch.Tensor]:
        f = self._file(int(self._shard[i]))
        r = int(self._row[i])
        text = self._file(int(self._text[i, 0]))
        t = int(self._text[i, 1])
        if self.time_ids_policy == "fixed":
            res = self.resolution
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * self.k, dtype=torch.float32)
        else:
            time_ids = torch.from_numpy(self._time_ids[i].copy())
        out = {
            "item_id": torch.tensor(int(self._item_id[i]), dtype=torch.int64),
            "mean": f.get_slice("mean")[r : r + self.k].float(),
            "logvar": f.get_slice("logvar")[r : r + self.k].float(),
            "prompt_embeds": text.get_slice("prompt_embeds")[t].float(),
            "time_ids": time_ids,
            "label": torch.tensor(float(self._label[i]), dtype=torch.float32),
            "ranks": torch.from_numpy(self._ranks[i].copy()),
            "pair": torch.from_numpy(self._pair[i].copy()),
            "pair_label": torch.tensor(float(self._pair_label[i]), dtype=torch.float32),
            "scores": torch.from_numpy(self._scores[i].copy()),
            "extra_scores": {name: torch.from_numpy(v[i].copy()) for name, v in self.extra_scores.items()},
        }
        if self.mirrored:
            out["mean_mirrored"] = f.get_slice("mean_mirrored")[r : r + self.k].float()
            out["logvar_mirrored"] = f.get_slice("logvar_mirrored")[r : r + self.k].float()
            out["flip_group"] = self.flip_group.clone()
        if self.family == "sdxl":
            out["pooled"] = text.get_slice("pooled")[t].float()
        return out
