"""`diffalign score`: every image of a folder through one or more scorers, in bounded memory.

Batches of images are decoded and preprocessed by each scorer's official transform in worker threads
while the main thread runs the models on the previous batch; at most ``workers + 1`` batches are in
memory. Images are opened as stored (PIL's own ``convert("RGB")`` in each transform, as the official
loaders do); an image that cannot be read is reported with the reason and skipped. Results: one row per
image (``file``, ``prompt``, ``seed``, one column per scorer dimension: ``<scorer>`` for overall,
``<scorer>.<dimension>`` for the others) as CSV and jsonl, and a summary (n, mean, std, min, max).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from diffalign.data.errors import CorruptImageError
from diffalign.data.images import open_image
from diffalign.eval.imagefolder import ImageRecord
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
        """``<stem>.csv``, ``<stem>.jsonl`` and ``<stem>_summary.json`` (each written atomically)."""
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
        return paths


def _load_batch(folder: Path, batch: Sequence[ImageRecord], scorers: Mapping[str, Scorer]):
    """Decode a batch and apply each model scorer's preprocessing (runs in a worker thread). An image that
    cannot be decoded, or that a scorer's transform refuses (e.g. HPSv3's aspect-ratio limit), is skipped
    with the reason; the rest of the batch is kept."""
    images, kept, skipped = [], [], []
    for r in batch:
        try:
            images.append(open_image(folder / r.file, where=str(folder / r.file)))
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
                  workers: int = 4, progress: bool = True) -> FolderScores:
    """Score ``records`` (images under ``folder``) with every scorer (module docstring)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    started = time.perf_counter()
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    kept_all: list[ImageRecord] = []
    skipped_all: list[tuple[str, str]] = []
    chunks: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=len(records), desc=f"scoring {folder.name}", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        upcoming = iter(batches)
        for batch in upcoming:  # fill the pipeline
            pending.append(pool.submit(_load_batch, folder, batch, scorers))
            if len(pending) >= max(1, workers):
                break
        while pending:
            kept, inputs, skipped = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(_load_batch, folder, following, scorers))
            skipped_all += skipped
            if kept:
                prompts = [r.prompt for r in kept]
                for name, scorer in scorers.items():
                    for dim, values in _run(scorer, inputs[name], prompts).items():
                        chunks.setdefault(column(name, dim), []).append(values)
                kept_all += kept
            bar.update(len(kept) + len(skipped))
    bar.close()
    scores = {k: torch.cat(v).numpy().astype(np.float64) for k, v in chunks.items()}
    return FolderScores(kept_all, scores, skipped_all, time.perf_counter() - started)


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
