"""The unit every preference source yields (`SourceItem`) and the small interface a source implements."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from diffalign.data.errors import DataError


@dataclass
class SourceItem:
    """One prompt with K >= 2 images and its preference signal, or (captioned-image sources) K = 1 image and none.

    - `source_id`: stable name inside the source (e.g. ``"train-0001.parquet:17"``); crop/flip draws hash it.
    - `images`: K encoded images (bytes) or paths to image files.
    - `label`: K = 2 only, P(images[0] preferred); 0.5 is a tie.
    - `ranks`: per image, 0 = best (equal ranks are ties).
    - `scores`: per image, higher = better.
    - `extra_scores`: optional raw per-image scores by scorer name, kept beside the signal for analysis
      (the synthetic source's `scores` are win-rates computed from them); not a preference signal itself.
    At least one of label / ranks / scores is set when K >= 2, none when K = 1 (`validate_item` checks it).
    """

    source_id: str
    caption: str
    images: list[bytes | Path]
    label: float | None = None
    ranks: list[int] | None = None
    scores: list[float] | None = None
    extra_scores: dict[str, list[float]] | None = None

    @property
    def k(self) -> int:
        return len(self.images)

    @property
    def is_tie(self) -> bool:
        return self.label is not None and self.label == 0.5


class Source(Protocol):
    """What the cache builder needs from a source."""

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        """Items in a fixed order, beginning with the `start`-th (0-based); cheap to skip ahead."""

    def count(self) -> int | None:
        """Number of items if cheaply known (for progress bars), else None."""

    def describe(self) -> dict:
        """JSON-able description for the manifest (kind, resolved paths, parameters)."""

    def digest(self) -> str:
        """Content hash identifying the data (cheap even for huge files; each source documents its method)."""


def validate_item(item: SourceItem, where: str | None = None) -> SourceItem:
    """Check types and the preference signal; raise `DataError` naming `where` (or the source_id)."""
    at = where or item.source_id

    def bad(msg: str) -> DataError:
        return DataError(f"{at}: {msg}")

    if not isinstance(item.caption, str):
        raise bad(f"caption must be a string, got {type(item.caption).__name__}")
    if not isinstance(item.images, list) or not item.images:
        raise bad(f"needs a list of images, got {item.images!r:.80}")
    k = len(item.images)
    if k == 1:  # a captioned image (methods without preferences)
        if item.label is not None or item.ranks is not None or item.scores is not None:
            raise bad("a single image cannot carry a preference signal (give at least 2 images)")
        return item
    if item.label is None and item.ranks is None and item.scores is None:
        raise bad("no preference signal: give one of 'label', 'ranks' or 'scores'")
    if item.label is not None:
        if k != 2:
            raise bad(f"'label' needs exactly 2 images, got {k} (use 'ranks' or 'scores' for lists)")
        if isinstance(item.label, bool) or not isinstance(item.label, (int, float)) or not 0.0 <= float(item.label) <= 1.0:
            raise bad(f"'label' must be a number in [0, 1] (P(images[0] preferred), 0.5 = tie), got {item.label!r}")
        item.label = float(item.label)
    if item.ranks is not None:
        if not isinstance(item.ranks, list) or len(item.ranks) != k:
            raise bad(f"'ranks' must be a list of {k} integers, got {item.ranks!r}")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in item.ranks):
            raise bad(f"'ranks' must be non-negative integers (0 = best), got {item.ranks!r}")
    if item.scores is not None:
        if not isinstance(item.scores, list) or len(item.scores) != k:
            raise bad(f"'scores' must be a list of {k} numbers, got {item.scores!r}")
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in item.scores):
            raise bad(f"'scores' must be finite numbers (higher = better), got {item.scores!r}")
        item.scores = [float(s) for s in item.scores]
    if item.extra_scores is not None:
        if not isinstance(item.extra_scores, dict) or not all(isinstance(n, str) and n for n in item.extra_scores):
            raise bad(f"'extra_scores' must map scorer names to lists of {k} numbers, got {item.extra_scores!r:.80}")
        for name, values in item.extra_scores.items():
            if not isinstance(values, list) or len(values) != k or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in values
            ):
                raise bad(f"'extra_scores[{name!r}]' must be a list of {k} finite numbers, got {values!r}")
        item.extra_scores = {n: [float(s) for s in v] for n, v in item.extra_scores.items()}
    return item
