"""Pick-a-Pic-v2-format parquet: one file or a directory of files with columns caption, jpg_0, jpg_1, label_0.

Rows are read with pyarrow in small record batches (memory stays bounded on the real, huge files) and
skipping ahead for a resumed build uses row-group metadata, so nothing before `start` is decoded.
`label_0` is P(jpg_0 preferred): 1 = jpg_0 wins, 0 = jpg_1 wins, 0.5 = tie. source_id = "<file>:<row>"
with the file named relative to the configured directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from diffalign.data.digest import METHOD, files_digest
from diffalign.data.errors import DataError
from diffalign.data.sources.base import SourceItem, validate_item

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
BATCH_ROWS = 64


class PickapicParquet:
    """A Pick-a-Pic-format source (`data.source.kind = pickapic`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(f"data.source.path: Pick-a-Pic parquet '{self.path}' does not exist")
        if self.path.is_dir():
            self.root = self.path
            self.files = sorted(self.path.rglob("*.parquet"), key=lambda p: p.relative_to(self.root).as_posix())
            if not self.files:
                raise DataError(f"data.source.path: directory '{self.path}' contains no .parquet files")
        else:
            self.root = self.path.parent
            self.files = [self.path]
        self._rows: list[int] = []
        for f in self.files:
            try:
                meta = pq.read_metadata(f)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
                raise DataError(f"data.source.path: '{f}' is not a readable parquet file ({e})") from None
            names = set(meta.schema.to_arrow_schema().names)
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise DataError(
                    f"data.source.path: '{f}' is missing column(s) {', '.join(repr(c) for c in missing)} "
                    f"(Pick-a-Pic format needs {', '.join(COLUMNS)}; found {', '.join(sorted(names))})"
                )
            self._rows.append(meta.num_rows)

    def _name(self, f: Path) -> str:
        return f.relative_to(self.root).as_posix()

    def count(self) -> int:
        return sum(self._rows)

    def describe(self) -> dict:
        return {"kind": "pickapic", "path": str(self.path.resolve()), "files": len(self.files), "rows": self.count()}

    def digest(self) -> str:
        return files_digest(self.files, self.root)

    digest_method = METHOD

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        offset = 0
        for f, n in zip(self.files, self._rows):
            if offset + n <= start:
                offset += n
                continue
            yield from self._file_items(f, offset, max(0, start - offset))
            offset += n

    def _file_items(self, f: Path, offset: int, skip: int) -> Iterator[SourceItem]:
        """Rows of one file from its `skip`-th on; whole row groups before it are never read."""
        pf = pq.ParquetFile(f)
        groups, row = [], 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > skip:
                groups.append(g)
            else:
                row += n
        name = self._name(f)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS), row_groups=groups):
            cols = {c: batch.column(c).to_pylist() for c in COLUMNS}
            for i in range(batch.num_rows):
                if row >= skip:
                    yield self._item(name, row, cols["caption"][i], cols["jpg_0"][i], cols["jpg_1"][i], cols["label_0"][i])
                row += 1

    @staticmethod
    def _item(name: str, row: int, caption, jpg_0, jpg_1, label) -> SourceItem:
        sid = f"{name}:{row}"
        if caption is None:
            caption = ""
        if label is None:
            raise DataError(f"{sid}: label_0 is null (expected 0, 0.5 or 1)")
        images = [b if b is not None else b"" for b in (jpg_0, jpg_1)]
        return validate_item(SourceItem(sid, caption, images, label=float(label)))
