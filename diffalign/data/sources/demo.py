"""The built-in synthetic preference set: toy-world scenes (`diffalign.toy.scenes`) and their captions.

The preferred image draws the scene as captioned; the other draws the same shape, place and size in a
wrong colour. Which of the two comes
first is random, and `label` (P(images[0] preferred)) says which. Everything is a pure function of
(seed, index), so the set is identical on every machine. Images are JPEG (quality 95) bytes, as in
Pick-a-Pic; `write_demo_parquet` writes the very same pairs as a Pick-a-Pic-format parquet.
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.data.digest import json_digest
from diffalign.data.sources.base import SourceItem
from diffalign.randomness import hash_int
from diffalign.toy.scenes import COLOURS, Scene, all_specs, render, sample_scene

VERSION = 2  # bump when the drawing changes, so old caches are refused (2: drawn by diffalign.toy.scenes)


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(hash_int(f"diffalign-demo\0{seed}\0{index}"))


def _jpeg(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def demo_pair(index: int, image_size: int = 64, seed: int = 0) -> tuple[str, bytes, bytes, float]:
    """(caption, jpg_0, jpg_1, label_0) of pair `index`: a toy scene as captioned vs. the same scene in a wrong colour."""
    r = _rng(seed, index)
    spec = r.choice(all_specs())
    scene = sample_scene(spec, r.randrange(1 << 30))
    wrong = dataclasses.replace(scene, spec=dataclasses.replace(spec, colour=r.choice([c for c in COLOURS if c != spec.colour])))
    good, bad = _jpeg(scene, image_size), _jpeg(wrong, image_size)
    if r.random() < 0.5:
        return spec.caption, good, bad, 1.0
    return spec.caption, bad, good, 0.0


class DemoPairs:
    """The synthetic source (`data.source.kind = demo`); source_id = "demo:<index>"."""

    def __init__(self, num_pairs: int = 64, image_size: int = 64, seed: int = 0):
        self.num_pairs, self.image_size, self.seed = num_pairs, image_size, seed

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for i in range(start, self.num_pairs):
            caption, a, b, label = demo_pair(i, self.image_size, self.seed)
            yield SourceItem(f"demo:{i}", caption, [a, b], label=label)

    def count(self) -> int:
        return self.num_pairs

    def describe(self) -> dict:
        return {"kind": "demo", "num_pairs": self.num_pairs, "image_size": self.image_size, "seed": self.seed, "version": VERSION}

    digest_method = "sha256 of the generator parameters and version"

    def digest(self) -> str:
        return json_digest(self.describe())


def write_demo_parquet(path: str | Path, num_pairs: int = 64, image_size: int = 64, seed: int = 0, row_group_size: int = 64) -> Path:
    """Write the demo pairs as a Pick-a-Pic-format parquet (caption, jpg_0, jpg_1, label_0) at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [demo_pair(i, image_size, seed) for i in range(num_pairs)]
    table = pa.table(
        {
            "caption": pa.array([r[0] for r in rows], pa.string()),
            "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
            "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
            "label_0": pa.array([r[3] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
