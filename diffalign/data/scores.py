"""Reward scores of a complete latent cache's source images, stored beside the latents (`data.scores`).

`score_cache` runs after the latents are complete (`prepare_cache` calls it; nothing to do without `data.scores`).
Every scorer has its own folder, so adding one never touches the latents or another scorer's files::

    scores/<scorer>/scorer.json         what the scores depend on, written first; a resume (and every reader) must match it:
                                        the scorer's `scorer_identity` (name, options, weight fingerprints), the cache's
                                        manifest fingerprint, how images are read, the score format
    scores/<scorer>/NNNNN.safetensors   the scores of cache shard NNNNN: one (rows, K) float32 tensor per score dimension
                                        ('overall' and the scorer's others), rows in the order of the shard's index parquet,
                                        NaN where an image could not be scored; metadata ``diffalign`` (JSON): shard, rows,
                                        the scorer.json digest, refused images with reasons. Written atomically: present and
                                        of the current digest = committed, so a killed run resumes at the first missing shard
    scores/<scorer>/summary.json        written last: the scores are complete (counts, dimensions, refused, overall stats)

What is scored: every image of every item the cache kept, decoded from the SOURCE as stored (`open_image`: original
resolution, no EXIF rotation, no crop or flip, i.e. what a reward model's own loader sees), with the item's caption as
the prompt. Items are matched to the index by `item_id` and checked by `source_id`. A shard's items are scored in
batches of whole items (`data.score_batch_size` images), the same batches on a resume. An image a scorer refuses
(its `score` raises ValueError) or scores non-finite, or that no longer decodes, gets NaN and is listed with the reason.

Readers (`load_scores`, used by `LatentPairDataset`) refuse missing or unfinished scores and scores of other scorer
settings, naming the scorer and the field. When a scorer's weight files are not reachable (e.g. a training machine
without them), complete scores are checked by name and options only, with a warning. A synthetic cache's own
per-scorer scores (the index's `extra_scores`) cannot be scored again under the same name.
"""

from __future__ import annotations

import json
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from diffalign.config import Config, ConfigError
from diffalign.data.digest import json_digest
from diffalign.data.errors import CacheIncompleteError, CacheMismatchError, CorruptImageError, DataError
from diffalign.data.images import open_image
from diffalign.data.prefetch import ordered_map
from diffalign.data.shards import index_path, shard_meta
from diffalign.data.sources import SourceItem, open_source
from diffalign.faults import fault_point
from diffalign.io import atomic_write_text, save_safetensors
from diffalign.locks import directory_lock
from diffalign.scorers.registry import REGISTRY, ScorerConfigError, available, load_scorers, scorer_identity

SCORES_DIR = "scores"
IDENTITY = "scorer.json"
SUMMARY = "summary.json"
META_KEY = "diffalign"
SCORE_FORMAT = 1
IMAGES = "source images as stored (diffalign.data.images.open_image): original resolution, no EXIF rotation, crop or flip"
_RUNTIME_OPTIONS = ("device", "batch_size")  # options that move work around without changing scores


def scorer_dir(root: str | Path, name: str) -> Path:
    return Path(root) / SCORES_DIR / name


def score_path(root: str | Path, name: str, shard: int) -> Path:
    return scorer_dir(root, name) / f"{shard:05d}.safetensors"


# ------------------------------------------------------------------------------------------------ identity


def _check_name(name: str, manifest: dict) -> None:
    if name not in available():
        raise ConfigError(f"data.scores: unknown scorer {name!r}; available: {', '.join(available())}")
    if name in manifest.get("extra_scores", []):
        raise ConfigError(f"data.scores: {name!r} already scored this cache's images (the synthetic source's per-scorer scores); "
                          "drop it from data.scores (it is in extra_scores already)")


def expected_record(name: str, options: dict, manifest: dict) -> dict:
    """What scorer.json must hold for `name` with `options` on the cache of `manifest` (loads no model), as JSON reads back."""
    try:
        identity = scorer_identity(name, **options)
    except OSError as e:  # a weight path given in data.score_options that is not readable here
        raise ScorerConfigError(f"scorer {name!r}: cannot read its weight files ({e})") from None
    record = {"format": SCORE_FORMAT, "images": IMAGES, "cache_fingerprint": manifest["fingerprint"], "scorer": identity}
    return json.loads(json.dumps(record))  # tuples become lists, as in the stored file


def _lenient_scorer(name: str, options: dict) -> dict:
    """The scorer fields known without its weight files: the name and the options that are not weight paths."""
    weights = REGISTRY[name].weights
    known = {"name": name, **{k: v for k, v in options.items() if k not in weights and k not in _RUNTIME_OPTIONS}}
    return json.loads(json.dumps(known, default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compare(stored: dict, expected: dict, name: str, folder: Path, only_scorer: bool = False) -> None:
    """Raise `CacheMismatchError` naming the scorer and every differing field of `expected` (all of it, or its scorer part)."""
    lines = []
    if not only_scorer:
        for key in ("format", "images", "cache_fingerprint"):
            if stored.get(key) != expected[key]:
                lines.append(f"{key}: the scores have {stored.get(key)!r:.80}, this cache needs {expected[key]!r:.80}")
    have, want = _flatten(stored.get("scorer", {})), _flatten(expected["scorer"])
    for key, value in want.items():
        if have.get(key, "<not recorded>") != value:
            lines.append(f"data.scores[{name}] {key}: the scores have {have.get(key, '<not recorded>')!r:.80}, the config asks {value!r:.80}")
    if lines:
        raise CacheMismatchError(f"data.scores: the scores of {name!r} at {folder} do not match:\n  " + "\n  ".join(lines) + "\n"
                                 f"Delete {folder} to score again (the latents and other scorers' files stay as they are).")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (OSError, ValueError) as e:
        raise CacheIncompleteError(f"{path}: unreadable ({e}); delete {path.parent} and run `diffalign prepare` to score again") from None


def check_scores(root: str | Path, name: str, options: dict, manifest: dict) -> dict:
    """The summary of the complete scores of `name` at `root` if they match `options` and this cache, else raise.

    Missing or unfinished: `CacheIncompleteError`; other settings or another cache: `CacheMismatchError` naming the
    scorer and field. Without the scorer's weight files, compared by name and options only (with a warning)."""
    _check_name(name, manifest)
    folder = scorer_dir(root, name)
    if not (folder / SUMMARY).is_file():
        state = "are unfinished" if (folder / IDENTITY).is_file() else "do not exist"
        raise CacheIncompleteError(f"data.scores: the scores of {name!r} at {folder} {state}; run `diffalign prepare` to score the cache")
    stored = _read_json(folder / IDENTITY)
    try:
        _compare(stored, expected_record(name, options, manifest), name, folder)
    except ScorerConfigError as e:
        warnings.warn(f"data.scores: {e}; the scores of {name!r} are checked by name and options only", stacklevel=2)
        _compare(stored, {"scorer": _lenient_scorer(name, options)}, name, folder, only_scorer=True)
        if stored.get("cache_fingerprint") != manifest["fingerprint"]:
            raise CacheMismatchError(f"data.scores: the scores of {name!r} at {folder} belong to another build of this cache; delete "
                                     f"{folder} and run `diffalign prepare` to score again") from None
    summary = _read_json(folder / SUMMARY)
    if summary.get("identity") != json_digest(stored):
        raise CacheIncompleteError(f"{folder / SUMMARY}: does not belong to {folder / IDENTITY}; delete {folder} and score again")
    return summary


def _committed(root: Path, name: str, shard: int, digest: str) -> bool:
    path = score_path(root, name, shard)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception:  # noqa: BLE001 - a damaged file is simply not committed; it is scored again
        return False
    return meta.get("identity") == digest


def _discard_temporaries(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink()


# ------------------------------------------------------------------------------------------------ scoring


def score_cache(cfg: Config, manifest: dict, progress: bool = True) -> None:
    """Score the complete cache of `manifest` (at `cfg.data.cache_dir`) with every scorer of `cfg.data.scores` whose
    scores are missing or unfinished; complete ones are only checked (see the module docstring)."""
    names = list(cfg.data.scores)
    if not names:
        return
    root = Path(cfg.data.cache_dir)
    shards = int(manifest["counts"]["shards"])
    records: dict[str, dict] = {}
    for name in names:  # every scorer is checked before anything is written
        options = cfg.data.score_options.get(name, {})
        _check_name(name, manifest)
        folder = scorer_dir(root, name)
        if (folder / SUMMARY).is_file():
            check_scores(root, name, options, manifest)
            continue
        try:
            records[name] = expected_record(name, options, manifest)
        except ScorerConfigError as e:
            raise ScorerConfigError(f"data.scores: {e} (in a config: data.score_options.{name}.<option>)") from None
        if (folder / IDENTITY).is_file():
            _compare(_read_json(folder / IDENTITY), records[name], name, folder)
    if records:
        with directory_lock(root, "data.cache_dir"):  # one scorer of this cache at a time
            _score_missing(cfg, root, manifest, records, shards, progress)


def _score_missing(cfg: Config, root: Path, manifest: dict, records: dict[str, dict], shards: int, progress: bool) -> None:
    pending: dict[str, list[int]] = {}
    for name, record in records.items():
        folder = scorer_dir(root, name)
        if (folder / IDENTITY).is_file():
            _discard_temporaries(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / IDENTITY, json.dumps(record, indent=2, sort_keys=True) + "\n")
        pending[name] = [s for s in range(shards) if not _committed(root, name, s, json_digest(record))]
    todo = {name: s for name, s in pending.items() if s}
    if todo:
        _Scoring(cfg, root, manifest, todo, {name: json_digest(records[name]) for name in todo}).run(progress)
    for name, record in records.items():
        _write_summary(root, name, record, shards)


def _runs(shards: Iterable[int]) -> list[list[int]]:
    """Consecutive shard numbers grouped: [0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]] (one source stream per run)."""
    runs: list[list[int]] = []
    for s in sorted(shards):
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _open_item(pair: tuple[int, SourceItem]) -> list | CorruptImageError:
    """The item's images as stored (runs in a worker thread); the decoding error instead of raising."""
    item = pair[1]
    try:
        return [open_image(src, where=item.source_id) for src in item.images]
    except CorruptImageError as e:
        return e


class _Scoring:
    """Scores the pending shards of each scorer and commits one file per (scorer, shard)."""

    def __init__(self, cfg: Config, root: Path, manifest: dict, todo: dict[str, list[int]], digests: dict[str, str]):
        self.cfg, self.root, self.todo, self.digests = cfg, root, todo, digests
        self.k = int(manifest["counts"]["k"])

    def run(self, progress: bool) -> None:
        d = self.cfg.data
        todo = {name: set(shards) for name, shards in self.todo.items()}
        shards = sorted(set().union(*todo.values()))
        metas = {s: shard_meta(self.root, s) for s in shards}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorers = load_scorers(list(todo), {n: d.score_options.get(n, {}) for n in todo}, device=device, batch_size=d.score_batch_size)
        source = open_source(d.source, self.cfg)
        kept = sum(m["source_items"] - len(m["skipped"]) for m in metas.values())
        bar = tqdm(total=kept, unit="item", desc=f"scoring {', '.join(todo)}", disable=not progress)
        try:
            for run in _runs(shards):
                stream = source.items(metas[run[0]]["first_item"])
                for s in run:
                    rows = pq.read_table(index_path(self.root, s), columns=["item_id", "source_id"]).to_pylist()
                    names = [n for n in todo if s in todo[n]]
                    self._shard(s, metas[s], rows, islice(stream, metas[s]["source_items"]), {n: scorers[n] for n in names}, bar)
        finally:
            bar.close()
            close = getattr(source, "close", None)
            if close is not None:
                close()
            del scorers
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _kept(self, shard: int, meta: dict, rows: list[dict], items: Iterator[SourceItem]) -> Iterator[tuple[int, SourceItem]]:
        """(row, item) for the source items the shard kept, checked against the index."""
        wanted = {r["item_id"]: j for j, r in enumerate(rows)}
        seen = 0
        for offset, item in enumerate(items):
            j = wanted.get(meta["first_item"] + offset)
            if j is None:
                continue
            if item.source_id != rows[j]["source_id"] or item.k != self.k:
                raise DataError(f"data.source: item {meta['first_item'] + offset} is {item.source_id} with {item.k} images, but shard {shard} "
                                f"of the cache holds {rows[j]['source_id']} with {self.k}; the source changed since the cache was built")
            seen += 1
            yield j, item
        if seen != len(rows):
            raise DataError(f"data.source: ended before the {len(rows)} items of cache shard {shard} (found {seen}); the source changed "
                            "since the cache was built")

    def _shard(self, shard: int, meta: dict, rows: list[dict], items: Iterator[SourceItem], scorers: dict, bar) -> None:
        d, k = self.cfg.data, self.k
        values = {n: {dim: np.full((len(rows), k), np.nan, np.float32) for dim in s.dimensions} for n, s in scorers.items()}
        refused: dict[str, list[dict]] = {n: [] for n in scorers}
        per_batch = max(1, d.score_batch_size // k)
        batch: list = []
        ahead = max(2 * d.decode_workers, per_batch)
        for (j, item), images in ordered_map(_open_item, self._kept(shard, meta, rows, items), d.decode_workers, ahead):
            batch.append((j, item, images))
            if len(batch) == per_batch:
                self._score_batch(batch, scorers, values, refused)
                bar.update(len(batch))
                batch = []
        if batch:
            self._score_batch(batch, scorers, values, refused)
            bar.update(len(batch))
        for name in scorers:
            info = {"shard": shard, "rows": len(rows), "identity": self.digests[name], "refused": refused[name]}
            commit_shard(self.root, name, shard, {dim: torch.from_numpy(v) for dim, v in values[name].items()}, info)

    def _score_batch(self, batch: list, scorers: dict, values: dict, refused: dict) -> None:
        """Score the decodable items of `batch` with each scorer; NaN and a reason for what cannot be scored."""
        k = self.k
        good = [(j, item, images) for j, item, images in batch if not isinstance(images, CorruptImageError)]
        for j, item, images in batch:
            if isinstance(images, CorruptImageError):
                for name in scorers:
                    refused[name].append({"source_id": item.source_id, "reason": images.reason})
        if not good:
            return
        flat = [im for _, _, images in good for im in images]
        prompts = [item.caption for _, item, _ in good for _ in range(k)]
        for name, scorer in scorers.items():
            try:
                out = scorer.score(flat, prompts)
            except ValueError:  # one of the items is refused: score them one by one to find it
                out = None
            if out is not None:
                table = _as_numpy(out, name, scorer.dimensions, len(flat))
                groups = [(j, item, {dim: v[n * k : (n + 1) * k] for dim, v in table.items()}) for n, (j, item, _) in enumerate(good)]
            else:
                groups = []
                for j, item, images in good:
                    try:
                        one = scorer.score(images, [item.caption] * k)
                    except ValueError as e:
                        refused[name].append({"source_id": item.source_id, "reason": f"refused by {name}: {e}"})
                        continue
                    groups.append((j, item, _as_numpy(one, name, scorer.dimensions, k)))
            for j, item, out in groups:
                if not np.isfinite(out["overall"]).all():
                    refused[name].append({"source_id": item.source_id, "reason": f"non-finite {name} score {out['overall'].tolist()}"})
                for dim, v in out.items():
                    values[name][dim][j] = np.where(np.isfinite(v), v, np.nan)


def _as_numpy(out: dict, name: str, dimensions: Iterable[str], n: int) -> dict[str, np.ndarray]:
    """The scorer's result as {dimension: (n,) float32}; a missing dimension or a wrong count is a `DataError` (a broken
    scorer, not a refused image)."""
    result = {}
    for dim in dimensions:
        if dim not in out:
            raise DataError(f"data.scores: scorer {name!r} returned no {dim!r} scores (it returned {sorted(out)})")
        v = torch.as_tensor(out[dim]).detach().float().cpu().reshape(-1).numpy()
        if v.shape != (n,):
            raise DataError(f"data.scores: scorer {name!r} returned {v.shape[0]} {dim!r} scores for {n} images")
        result[dim] = v
    return result


def commit_shard(root: Path, name: str, shard: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write one (scorer, shard) file atomically; its presence with the current digest is the commit."""
    save_safetensors(score_path(root, name, shard), tensors, metadata={META_KEY: json.dumps(info, sort_keys=True)})
    fault_point("scores.shard")


def _write_summary(root: Path, name: str, record: dict, shards: int) -> None:
    folder = scorer_dir(root, name)
    if (folder / SUMMARY).is_file():
        return
    refused, items, dims, overall = [], 0, None, []
    for s in range(shards):
        with safe_open(str(score_path(root, name, s)), framework="pt") as f:
            info = json.loads(f.metadata()[META_KEY])
            dims = dims or sorted(f.keys())
            overall.append(f.get_tensor("overall").numpy().reshape(-1))
        refused += info["refused"]
        items += info["rows"]
    o = np.concatenate(overall) if overall else np.zeros(0, np.float32)
    o = o[np.isfinite(o)]
    stats = {"mean": float(o.mean()), "std": float(o.std()), "min": float(o.min()), "max": float(o.max())} if o.size else None
    summary = {"scorer": name, "complete": True, "identity": json_digest(record), "shards": shards, "items": items,
               "dimensions": dims or [], "overall": stats, "refused": refused}
    atomic_write_text(folder / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ reading


def load_scores(root: str | Path, manifest: dict, names: Iterable[str], options: dict[str, dict], rows_per_shard: np.ndarray,
                dimension: str = "overall") -> dict[str, np.ndarray]:
    """{scorer: (items, K) float32} of one score dimension, the rows of all shards in index order (`rows_per_shard[s]`
    rows in shard s); complete scores of matching settings only (`check_scores`)."""
    out = {}
    for name in names:
        check_scores(root, name, options.get(name, {}), manifest)
        parts = []
        for s, n in enumerate(rows_per_shard):
            path = score_path(root, name, s)
            with safe_open(str(path), framework="pt") as f:
                if dimension not in f.keys():
                    raise DataError(f"{path}: no {dimension!r} scores (it has {', '.join(sorted(f.keys()))})")
                table = f.get_tensor(dimension).numpy()
            if table.shape[0] != n:
                raise CacheMismatchError(f"{path}: {table.shape[0]} rows, but cache shard {s} has {n} items; delete {path.parent} and score again")
            parts.append(table)
        out[name] = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, int(manifest["counts"]["k"])), np.float32)
    return out
