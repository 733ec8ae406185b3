"""`LatentPairDataset`: items of a complete latent cache as dicts of tensors, ready for `default_collate`.

Item ``i`` gives:
- ``item_id`` int64 scalar: the item's position in the source stream (stable; trainers seed draws with it);
- ``mean``, ``logvar`` (K, C, h, w) float32: the unscaled VAE posterior of the K images;
- ``prompt_embeds`` (L, D) float32, and ``pooled`` (D2,) for SDXL;
- ``time_ids`` (K, 6) float32: [orig_h, orig_w, crop_top, crop_left, res, res] (``data.time_ids = 'true'``)
  or [res, res, 0, 0, res, res] for every image (``'fixed'``, the official behaviour);
- ``label`` float32: P(images[0] preferred), NaN when the item is not a labelled pair;
- ``ranks`` (K,) int64, 0 = best: as given, else from the label (1 -> [0, 1], 0 -> [1, 0], 0.5 -> [0, 0]),
  else the dense rank of descending scores;
- ``scores`` (K,) float32, NaN when absent.
Raw per-scorer scores (synthetic source) are not part of an item: ``dataset.extra_scores[name]`` is an
(len, K) float32 array aligned with the items (NaN where an item has none).
Ties (label 0.5) are dropped unless ``data.ties = 'keep'``; with ``data.min_score_gap > 0`` so are items whose
best and worst image differ by less than that in raw score (`score_gaps`). Shards are opened lazily with
``safetensors.safe_open`` and the handles kept per process (at most `MAX_OPEN_SHARDS`, reopened after a
fork, never pickled), so the dataset works in DataLoader workers. Caption dropout and posterior sampling belong to the trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffalign.config import DataConfig
from diffalign.data.errors import CacheIncompleteError, CacheMismatchError, DataError
from diffalign.data.identity import diff_identity
from diffalign.data.manifest import MANIFEST, TEXT_EMPTY, format_error
from diffalign.data.shards import fixed_lists, read_index, tensors_path

MAX_OPEN_SHARDS = 256  # per process; least recently used handles are closed beyond this
_CHECKED = ("data.resolution", "data.crop", "data.random_flip", "data.pairing", "data.seed", "data.latent_dtype", "data.max_items")


def dense_ranks(scores: np.ndarray) -> np.ndarray:
    """Dense rank by descending score: [0.9, 0.2, 0.9] -> [0, 1, 0]."""
    distinct = np.unique(scores)[::-1]
    return np.searchsorted(-distinct, -scores).astype(np.int64)


def label_ranks(label: float) -> np.ndarray:
    """Ranks of a labelled pair: images[0] best when label > 0.5, images[1] when < 0.5, a tie at 0.5."""
    return np.array([0, 1] if label > 0.5 else [1, 0] if label < 0.5 else [0, 0], dtype=np.int64)


class LatentPairDataset(torch.utils.data.Dataset):
    """The items of the cache at `cache_dir`, read as `data_cfg` asks (ties, time_ids)."""

    def __init__(self, cache_dir: str | Path, data_cfg: DataConfig):
        self.root = Path(cache_dir)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise CacheIncompleteError(f"{self.root}: no complete latent cache here (manifest.json missing); run `diffalign prepare` first")
        self.manifest = json.loads(manifest_path.read_text())
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
        self._load_index(int(self.manifest["counts"]["shards"]), keep_ties=data_cfg.ties == "keep", min_gap=data_cfg.min_score_gap)
        empty = load_file(str(self.root / TEXT_EMPTY))
        self.empty_prompt_embeds = empty["prompt_embeds"].float()
        self.empty_pooled = empty["pooled"].float() if "pooled" in empty else None
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def _load_index(self, shards: int, keep_ties: bool, min_gap: float) -> None:
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
        self._ranks = fixed_lists(t.column("ranks"), k, np.int64, -1)
        self._scores = fixed_lists(t.column("scores"), k, np.float64, np.nan).astype(np.float32)
        extra = t.column("extra_scores").combine_chunks()
        self.extra_scores: dict[str, np.ndarray] = {}
        for name in sorted(pc.unique(extra.keys).to_pylist()):
            values = pa.chunked_array([pc.map_lookup(extra, pa.scalar(name), "first")])
            self.extra_scores[name] = fixed_lists(values, k, np.float64, np.nan).astype(np.float32)
        keep = np.ones(len(label), dtype=bool) if keep_ties else ~(label == 0.5)
        if min_gap > 0:
            gaps = self.score_gaps()
            if np.isnan(gaps).any():
                i = int(np.flatnonzero(np.isnan(gaps))[0])
                raise DataError(f"data.min_score_gap: item {int(self._item_id[i])} of the cache at {self.root} has no scores to measure a gap with")
            keep &= gaps >= min_gap
        for name in ("_item_id", "_shard", "_row", "_text", "_time_ids", "_label", "_ranks", "_scores"):
            setattr(self, name, getattr(self, name)[keep])
        self.extra_scores = {name: v[keep] for name, v in self.extra_scores.items()}

    def score_gaps(self) -> np.ndarray:
        """(len,) raw score of each item's best image minus its worst's (by rank), averaged over its scorers;
        the item's `scores` when it has no per-scorer scores; NaN when it has neither."""
        n = len(self._item_id)
        ranks = np.stack([self._ranks_of(i) for i in range(n)]) if n else np.zeros((0, self.k), np.int64)
        order = np.argsort(ranks, axis=1, kind="stable")  # as the trainer pairs them (batch.winner_loser)
        best, worst, rows = order[:, 0], order[:, -1], np.arange(n)
        tables = list(self.extra_scores.values()) or [self._scores]
        gaps = np.stack([t[rows, best] - t[rows, worst] for t in tables])  # (scorers, n)
        return gaps.mean(axis=0)

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
            f = safe_open(str(tensors_path(self.root, shard)), framework="pt")
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles)))  # least recently used
        self._handles[shard] = f
        return f

    def _ranks_of(self, i: int) -> np.ndarray:
        if self._ranks[i, 0] >= 0:
            return self._ranks[i]
        if not np.isnan(self._label[i]):
            return label_ranks(float(self._label[i]))
        return dense_ranks(self._scores[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i = int(i) % len(self)
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
            "ranks": torch.from_numpy(self._ranks_of(i).copy()),
            "scores": torch.from_numpy(self._scores[i].copy()),
        }
        if self.family == "sdxl":
            out["pooled"] = text.get_slice("pooled")[t].float()
        return out
