"""`diffalign score`: every image of a folder through one or more scorers, in bounded memory.

Batches of images are decoded and preprocessed by each scorer's official transform in worker threads
while the main thread runs the models on the previous batch; at most ``workers + 1`` batches are in
memory. Images are opened in their stored mode (PIL's own ``convert("RGB")`` in each transform, as the official
loaders do), turned as their EXIF orientation says (as a viewer shows them; the official loaders skip this, which
matters only for photos carrying the tag); an image that cannot be read is reported with the reason and skipped (``strict``: the first one
stops the run, naming it; more than ``max_consecutive_failures`` in a row stop it too, as a wrong folder would).
The folder is only read. Results: one row per image (``file``, ``prompt``, ``seed``, one column per scorer
dimension: ``<scorer>`` for overall, ``<scorer>.<dimension>`` for the others) as CSV and jsonl, and a summary (n,
mean, std, min, max).

Resumable (`ScoreJournal`): each finished batch is appended to ``<stem>.partial.jsonl`` and fsynced; a run killed
at any point and started again with the same identity (scorers, their options and weights, the records, the batch
size) continues after the last complete batch, and its tables equal an uninterrupted run's row for row and bit for
bit. The finished tables replace the journal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import ImageOps

from diffalign.data.errors import CorruptImageError, DataError
from diffalign.data.images import open_image
from diffalign.eval.imagefolder import ImageRecord
from diffalign.faults import fault_point
from diffalign.io import atomic_write_text
from diffalign.scorers.base import ModelScorer, Scorer


def column(scorer: str, dimension: str) -> str:
    return scorer if dimension == "overall" else f"{scorer}.{dimension}"


@dataclass
class FolderScores:
    records: list[ImageRecord]  # the scored images, in folder order
    scores: dict[str, np.ndarray]  # column -> (len(records),)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
                for name, v in self.scores.items() if v.size}

    def rows(self) -> list[dict]:
        return [{"file": r.file, "prompt": r.prompt, "seed": r.seed, **{k: float(v[i]) for k, v in self.scores.items()}}
                for i, r in enumerate(self.records)]

    def write(self, stem: str | Path) -> list[Path]:
        """``<stem>.csv``, ``<stem>.jsonl`` and ``<stem>_summary.json`` (each written atomically); then the run's journal
        (`journal_path`), if any, is removed."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["file", "prompt", "seed", *self.scores])
        writer.writeheader()
        writer.writerows(rows)
        paths = [stem.with_suffix(".csv"), stem.with_suffix(".jsonl"), stem.with_name(stem.name + "_summary.json")]
        atomic_write_text(paths[0], buf.getvalue())
        atomic_write_text(paths[1], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary = {"images": len(self.records), "seconds": self.seconds, "columns": self.summary(),
                   "skipped": [{"file": f, "reason": why} for f, why in self.skipped]}
        atomic_write_text(paths[2], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        journal_path(stem).unlink(missing_ok=True)  # the tables supersede the journal of a resumable run
        for journal in stem.parent.glob(journal_path(rank_stem(stem, "*")).name):  # and those of the ranks of a split run
            journal.unlink()
        return paths


def journal_path(stem: str | Path) -> Path:
    stem = Path(stem)
    return stem.with_name(stem.name + ".partial.jsonl")


class ScoreJournal:
    """The batches a `score` run has finished, in ``<stem>.partial.jsonl``: an identity line, then one line per batch
    (its files in order, the skipped ones with reasons, each column's values), appended and fsynced as the batch
    finishes. A torn last line (a kill inside the write) is dropped; a journal of another identity is set aside."""

    def __init__(self, path: str | Path, identity: dict):
        self.path = Path(path)
        self.head = json.dumps({"identity": identity}, sort_keys=True)
        self._file = None

    def load(self) -> list[dict]:
        """The complete batches of an earlier run of this identity (none if there is no journal or it is another's)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")[:-1]  # the last piece is empty, or a torn line
        try:
            if not lines or lines[0].decode("utf-8") != self.head:
                warnings.warn(f"{self.path}: left by a run of other settings or records; starting over", stacklevel=2)
                return []
            batches = [json.loads(line) for line in lines[1:]]
            if not all(isinstance(b, dict) and {"files", "skipped", "scores"} <= b.keys() for b in batches):
                raise ValueError("a batch line is not a batch record")
            return batches
        except (UnicodeDecodeError, ValueError) as e:
            warnings.warn(f"{self.path}: unreadable ({e}); starting over", stacklevel=2)
            return []

    def start(self, done: list[dict]) -> None:
        """Rewrite the journal as its identity and the `done` batches (atomically), then keep it open to append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(line + "\n" for line in [self.head, *map(json.dumps, done)]))
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, batch: dict) -> None:
        line = json.dumps(batch) + "\n"
        half = len(line) // 2
        self._file.write(line[:half])
        self._file.flush()
        fault_point("score.mid_line")  # the kill tests' torn line
        self._file.write(line[half:])
        self._file.flush()
        os.fsync(self._file.fileno())
        fault_point("score.batch")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rank_stem(stem: str | Path, rank: int | str) -> Path:
    """The output stem of one rank's share of a split run (its journal is `journal_path` of it)."""
    stem = Path(stem)
    return stem.with_name(f"{stem.name}.rank{rank}")


def rank_share(records: Sequence[ImageRecord], batch_size: int, rank: int, world: int) -> list[ImageRecord]:
    """Rank `rank`'s share of a run split over `world` processes: batches k ≡ rank (mod world) of `records`, cut as one
    process cuts them, concatenated. `score_records` cuts the share into the same batches again (every batch but the
    folder's last is full, and that one ends its share), so each image is scored in the batch one process scores it in."""
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    return [r for batch in batches[rank::world] for r in batch]


def merge_shares(records: Sequence[ImageRecord], shares: Sequence[FolderScores]) -> FolderScores:
    """The ranks' results as one run's: rows in the folder's order, skipped images in it too, the slowest rank's time."""
    rows: dict[str, tuple[ImageRecord, dict[str, float]]] = {}
    skipped: dict[str, str] = {}
    for share in shares:
        rows |= {r.file: (r, {k: v[i] for k, v in share.scores.items()}) for i, r in enumerate(share.records)}
        skipped |= dict(share.skipped)
    kept = [r for r in records if r.file in rows]
    columns = list(shares[0].scores) if shares else []
    scores = {k: np.asarray([rows[r.file][1][k] for r in kept], dtype=np.float64) for k in columns}
    return FolderScores(kept, scores, [(r.file, skipped[r.file]) for r in records if r.file in skipped],
                        max((s.seconds for s in shares), default=0.0))


def records_digest(records: Sequence[ImageRecord]) -> str:
    """A fingerprint of which images are scored, in which order, with which prompts."""
    text = json.dumps([[r.file, r.prompt, r.seed] for r in records], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_batch(folder: Path, batch: Sequence[ImageRecord], scorers: Mapping[str, Scorer]):
    """Decode a batch and apply each model scorer's preprocessing (runs in a worker thread). An image that
    cannot be decoded, or that a scorer's transform refuses (e.g. HPSv3's aspect-ratio limit), is skipped
    with the reason; the rest of the batch is kept."""
    images, kept, skipped = [], [], []
    for r in batch:
        try:
            images.append(ImageOps.exif_transpose(open_image(folder / r.file, where=str(folder / r.file))))
            kept.append(r)
        except CorruptImageError as e:
            skipped.append((r.file, e.reason))
    try:
        return kept, _preprocess(images, scorers), skipped
    except ValueError:  # find the refused images one by one, keep the others
        usable = []
        for image, r in zip(images, kept):
            try:
                _preprocess([image], scorers)
                usable.append((image, r))
            except ValueError as e:
                skipped.append((r.file, str(e)))
        images, kept = [im for im, _ in usable], [r for _, r in usable]
        return kept, _preprocess(images, scorers), skipped


def _preprocess(images, scorers: Mapping[str, Scorer]) -> dict:
    """Each model scorer's official transform of the batch; other scorers take the PIL images."""
    return {name: (s.preprocess(images) if isinstance(s, ModelScorer) and images else images) for name, s in scorers.items()}


def _run(scorer: Scorer, inputs, prompts: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(scorer, ModelScorer):
        return scorer.score_batch(inputs, prompts)
    return {k: v.float().cpu() for k, v in scorer.score(inputs, prompts).items()}


def score_records(folder: str | Path, records: Sequence[ImageRecord], scorers: Mapping[str, Scorer], batch_size: int = 32,
                  workers: int = 4, progress: bool = True, *, strict: bool = False, max_consecutive_failures: int | None = 100,
                  journal: str | Path | None = None, identity: dict | None = None) -> FolderScores:
    """Score ``records`` (images under ``folder``) with every scorer (module docstring). ``journal``: the path of a
    `ScoreJournal` to resume from and append to, for the settings ``identity`` (scorers, options, weights)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    started = time.perf_counter()
    log = None
    done: list[dict] = []
    if journal is not None:
        log = ScoreJournal(journal, {**(identity or {}), "batch_size": batch_size, "records": records_digest(records)})
        done = log.load()
        log.start(done)
    by_file = {r.file: r for r in records}
    kept_all: list[ImageRecord] = []
    skipped_all: list[tuple[str, str]] = []
    chunks: dict[str, list[np.ndarray]] = {}

    def take(files: list[str], skipped: list[tuple[str, str]], values: dict[str, np.ndarray]) -> None:
        unread = dict(skipped)
        kept_all.extend(by_file[f] for f in files if f not in unread)
        skipped_all.extend(skipped)
        for name, v in values.items():
            chunks.setdefault(name, []).append(v)

    for batch in done:  # an earlier run's finished batches, as it scored them
        take(batch["files"], [tuple(x) for x in batch["skipped"]], {k: np.asarray(v, dtype=np.float64) for k, v in batch["scores"].items()})
    first = sum(len(b["files"]) for b in done)
    batches = [records[i : i + batch_size] for i in range(first, len(records), batch_size)]
    failures = _FailureRun(strict, max_consecutive_failures, folder)
    bar = tqdm(total=len(records), initial=first, desc=f"scoring {folder.name}", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending: deque = deque()
            upcoming = iter(batches)
            for batch in upcoming:  # fill the pipeline
                pending.append((batch, pool.submit(_load_batch, folder, batch, scorers)))
                if len(pending) >= max(1, workers):
                    break
            while pending:
                batch, future = pending.popleft()
                kept, inputs, skipped = future.result()
                following = next(upcoming, None)
                if following is not None:
                    pending.append((following, pool.submit(_load_batch, folder, following, scorers)))
                failures.check(batch, dict(skipped))
                values: dict[str, np.ndarray] = {}
                if kept:
                    prompts = [r.prompt for r in kept]
                    for name, scorer in scorers.items():
                        for dim, v in _run(scorer, inputs[name], prompts).items():
                            values[column(name, dim)] = v.numpy().astype(np.float64)
                files = [r.file for r in batch]
                take(files, skipped, values)
                if log is not None:
                    log.append({"files": files, "skipped": skipped, "scores": {k: v.tolist() for k, v in values.items()}})
                bar.update(len(batch))
    finally:
        bar.close()
        if log is not None:
            log.close()
    scores = {k: np.concatenate(v) for k, v in chunks.items()}
    return FolderScores(kept_all, scores, skipped_all, time.perf_counter() - started)


class _FailureRun:
    """Stops a run on the first unreadable image (``strict``) or after more than ``limit`` of them in a row."""

    def __init__(self, strict: bool, limit: int | None, folder: Path):
        self.strict, self.limit, self.folder, self.run = strict, limit, folder, 0

    def check(self, batch: Sequence[ImageRecord], skipped: dict[str, str]) -> None:
        for r in batch:
            if r.file not in skipped:
                self.run = 0
                continue
            if self.strict:
                raise CorruptImageError(f"{skipped[r.file]} (--strict stops at the first unreadable image)", str(self.folder / r.file))
            self.run += 1
            if self.limit is not None and self.run > self.limit:
                raise DataError(f"{self.folder}: {self.run} unreadable images in a row (the last: {r.file}: {skipped[r.file]}); is this "
                                f"the right folder? (--max-consecutive-failures {self.limit} sets how many are tolerated)")


def summary_table(result: FolderScores, title: str) -> str:
    """The summary as a rich table, rendered to text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("score", "n", "mean", "std", "min", "max"):
        table.add_column(name, justify="left" if name == "score" else "right")
    for name, s in result.summary().items():
        table.add_row(name, str(s["n"]), f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}")
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    return console.file.getvalue()
