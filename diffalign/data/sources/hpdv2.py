"""Human Preference Dataset v2 (HPDv2; HPSv2, Wu et al. 2023, arXiv:2306.09341): the official annotation json + image folder.

The format, as read from the official sources:
- the dataset card (huggingface.co/datasets/ymhao/HPDv2, README.md): ``train.json`` is a list of
  ``{'human_preference': list[int] (1 for preference), 'prompt': str, 'file_path': list[str]}``; ``test.json`` a list of
  ``{'prompt': str, 'image_path': list[str], 'rank': list[int] (averaged ranking of the image at the same index),
  'raw_annotations': list[{'rank', 'user_hash'}]}``;
- the HPSv2 training code (github.com/tgxs002/HPSv2, ``hpsv2/src/training/data.py``): ``HPDDataset`` reads train items'
  ``file_path``, ``human_preference`` and ``prompt``; ``RankingDataset`` (used by ``hpsv2/evaluation.py``'s ``test`` mode)
  reads test items' ``image_path``, ``rank`` and ``prompt``, scoring a model's ranking against ``rank`` with
  ``inversion_score``, so a lower ``rank`` is better;
- third-party loaders of the released ``train.json`` read its file names from ``image_path``. Both names are accepted
  (an item giving both is refused), so either release of the file reads the same.

Items: a train item (``human_preference``: exactly one 1 among two images) is a pair, ``label`` = P(images[0] preferred)
= 1 for ``[1, 0]`` and 0 for ``[0, 1]``; a test item (``rank``) is a ranked list, its ranks turned into diffalign's
convention (0 = best, equal ranks tie: the dense rank of ``rank`` ascending, whatever number the file starts at). An
item with both or neither signal, a wrong type or length, or an unsafe path raises `DataError` naming the file and the
item's index. A listed image missing on disk is reported when decoded, like a corrupt image (skipped and counted, or
fatal, per `data.corrupt_images`). File names are relative to the image folder (absolute paths and ``..`` refused).
source_id = "<json name>:<index>".

Digest: sha256 of the json bytes plus (path, size) of every referenced image (as the folder source).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

from diffalign.data.errors import DataError
from diffalign.data.sources.base import SourceItem, validate_item

FILE_KEYS = ("image_path", "file_path")  # test.json / the HPSv2 training code's train.json
KNOWN_KEYS = {"prompt", "human_preference", "rank", "raw_annotations", *FILE_KEYS}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def dense_ranks_ascending(values: list[float]) -> list[int]:
    """0 for the lowest value (the best HPDv2 rank), 1 for the next distinct value, ...; equal values share a rank."""
    order = {v: r for r, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


class Hpdv2Json:
    """An HPDv2 source (`data.source.kind = hpdv2`): the items of one official annotation json."""

    def __init__(self, path: str | Path, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.source.root: HPDv2 image folder '{self.root}' does not exist")
        file = Path(path).expanduser()
        if not file.is_file() and not file.is_absolute() and (self.root / file).is_file():
            file = self.root / file
        if not file.is_file():
            raise DataError(f"data.source.path: HPDv2 annotation file '{path}' does not exist (looked in the working directory and in {self.root})")
        self.path = file
        self._items: list | None = None

    def _raw(self) -> list:
        """The json's list of items, read once."""
        if self._items is None:
            try:
                data = json.loads(self.path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{self.path}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise DataError(f"{self.path}: expected a JSON list of items (the HPDv2 format), got {type(data).__name__}")
            self._items = data
        return self._items

    def _parse(self, index: int, obj) -> SourceItem:
        where = f"{self.path}: item {index}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each item must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - KNOWN_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown} (HPDv2 items have {', '.join(sorted(KNOWN_KEYS))})")
        if not isinstance(obj.get("prompt"), str):
            raise DataError(f"{where}: needs 'prompt', a string")
        given = [k for k in FILE_KEYS if k in obj]
        if len(given) != 1:
            raise DataError(f"{where}: needs the image file names in exactly one of 'image_path' or 'file_path' (found {given or 'neither'})")
        names = obj[given[0]]
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{where}: '{given[0]}' must be a list of at least 2 image file names, got {names!r:.80}")
        images = [self._resolve(where, n) for n in names]
        signals = [k for k in ("human_preference", "rank") if k in obj]
        if len(signals) != 1:
            raise DataError(f"{where}: needs exactly one of 'human_preference' (train pairs) or 'rank' (test lists), found {signals or 'neither'}")
        label = ranks = None
        if signals[0] == "human_preference":
            pref = obj["human_preference"]
            if len(names) != 2 or pref not in ([1, 0], [0, 1]) or any(isinstance(p, bool) for p in pref):
                raise DataError(f"{where}: 'human_preference' must be [1, 0] or [0, 1] (one 1 for the preferred of 2 images), got {pref!r:.80} "
                                f"for {len(names)} images")
            label = 1.0 if pref[0] == 1 else 0.0
        else:
            rank = obj["rank"]
            if not isinstance(rank, list) or len(rank) != len(names) or not all(_is_number(r) for r in rank):
                raise DataError(f"{where}: 'rank' must be a list of {len(names)} numbers (lower = better), got {rank!r:.80}")
            ranks = dense_ranks_ascending(rank)
        return validate_item(SourceItem(f"{self.path.name}:{index}", obj["prompt"], images, label=label, ranks=ranks), where)

    def _resolve(self, where: str, name: str) -> Path:
        p = Path(name)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{where}: image path '{name}' must be relative to data.source.root, without '..'")
        return self.root / p

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        raw = self._raw()
        for i in range(start, len(raw)):
            yield self._parse(i, raw[i])

    def count(self) -> int:
        return len(self._raw())

    def describe(self) -> dict:
        return {"kind": "hpdv2", "path": str(self.path.resolve()), "root": str(self.root.resolve()), "items": self.count()}

    digest_method = "sha256 of the json bytes + (relative path, size) of each referenced image"

    def digest(self) -> str:
        """Validates every item on the way, so a malformed item fails before any encoding starts."""
        h = hashlib.sha256(self.path.read_bytes())
        for i, obj in enumerate(self._raw()):
            for p in self._parse(i, obj).images:
                size = os.path.getsize(p) if os.path.isfile(p) else -1
                h.update(f"{Path(p).relative_to(self.root).as_posix()}\0{size}\n".encode())
        return h.hexdigest()
