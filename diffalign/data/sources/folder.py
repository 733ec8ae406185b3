"""Image folder + jsonl: one item per line, ``{"caption", "images": [paths relative to root], ...signal}``.

The signal is one or more of ``"label"`` (K = 2, P(images[0] preferred), 0.5 = tie), ``"ranks"`` (0 = best)
and ``"scores"`` (higher = better). A malformed line raises `DataError` with ``file:line``; image paths
must stay inside `root` (absolute paths and ``..`` escapes are refused). A listed image that is missing
on disk is reported when decoded, like a corrupt image (skipped or fatal per `data.corrupt_images`).
source_id = "<jsonl name>:<line number>".

Digest: sha256 of the whole jsonl plus (path, size) of every referenced image; image bytes are not
read, so replacing an image by a different one of identical size goes unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from diffalign.data.errors import DataError
from diffalign.data.sources.base import SourceItem, validate_item

SIGNALS = ("label", "ranks", "scores")


class FolderJsonl:
    """A folder + jsonl source (`data.source.kind = folder`)."""

    def __init__(self, root: str | Path, jsonl: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.source.root: image folder '{self.root}' does not exist")
        path = Path(jsonl).expanduser()
        if not path.is_file() and not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path
        if not path.is_file():
            raise DataError(f"data.source.jsonl: '{jsonl}' does not exist (looked in the working directory and in {self.root})")
        self.jsonl = path
        self._count: int | None = None

    def _lines(self) -> Iterator[tuple[int, str]]:
        with open(self.jsonl, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield n, line

    def _parse(self, n: int, line: str) -> SourceItem:
        where = f"{self.jsonl}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"caption", "images", *SIGNALS}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: caption, images, label, ranks, scores)")
        if "caption" not in obj or "images" not in obj:
            raise DataError(f"{where}: needs 'caption' and 'images'")
        images = obj["images"]
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"{where}: 'images' must be a list of relative paths")
        paths = [self._resolve(where, p) for p in images]
        item = SourceItem(f"{self.jsonl.name}:{n}", obj["caption"], paths, obj.get("label"), obj.get("ranks"), obj.get("scores"))
        return validate_item(item, where)

    def _resolve(self, where: str, rel: str) -> Path:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{where}: image path '{rel}' must be relative to the root folder, without '..'")
        return self.root / p

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for i, (n, line) in enumerate(self._lines()):
            if i >= start:
                yield self._parse(n, line)

    def count(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._lines())
        return self._count

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root.resolve()), "jsonl": str(self.jsonl.resolve())}

    digest_method = "sha256 of the jsonl bytes + (relative path, size) of each referenced image"

    def digest(self) -> str:
        """Validates every line on the way, so a bad line fails before any encoding starts."""
        h = hashlib.sha256(self.jsonl.read_bytes())
        for n, line in self._lines():
            for p in self._parse(n, line).images:
                size = os.path.getsize(p) if os.path.isfile(p) else -1
                h.update(f"{Path(p).relative_to(self.root).as_posix()}\0{size}\n".encode())
        return h.hexdigest()
