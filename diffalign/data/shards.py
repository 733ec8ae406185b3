"""The on-disk shard format of the latent cache: names, the index schema, committing and reading shards.

Shard ``s`` covers source items ``[s · shard_size, (s + 1) · shard_size)`` and is two files:
- ``shards/NNNNN.safetensors``: ``mean`` and ``logvar`` (N_images, C, h, w), the VAE posterior before
  the scaling factor, an item's K images on consecutive rows; ``prompt_embeds`` (N_new, L, D) and,
  for SDXL, ``pooled`` (N_new, D2) for the captions first seen in this shard (absent if none).
- ``shards/NNNNN.parquet``: one row per kept item (`INDEX_SCHEMA`); its key-value metadata
  ``diffalign`` holds the shard's bookkeeping (range of source items, skipped items with reasons,
  number of new captions). It is written after the tensors and is the shard's commit marker.
Both go through `diffalign.io`'s atomic writers (temporary name, fsync, ``os.replace``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.faults import fault_point
from diffalign.io import atomic_open, save_safetensors

SHARD_DIR = "shards"
META_KEY = b"diffalign"

INDEX_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),  # position in the source stream: stable across re-sharding
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("text_shard", pa.int32(), nullable=False),  # shard whose safetensors holds the caption's embedding
        pa.field("text_row", pa.int32(), nullable=False),
        pa.field("latent_rows", pa.list_(pa.int32()), nullable=False),  # K rows of mean/logvar in this shard
        pa.field("k", pa.int32(), nullable=False),
        pa.field("time_ids", pa.list_(pa.list_(pa.int32())), nullable=False),  # K × [orig_h, orig_w, top, left, res, res]
        pa.field("flips", pa.list_(pa.bool_()), nullable=False),  # whether each image was mirrored
        pa.field("label", pa.float64()),  # P(images[0] preferred), 0.5 = tie; null for lists
        pa.field("ranks", pa.list_(pa.int32())),  # 0 = best; null unless the source gave ranks
        pa.field("scores", pa.list_(pa.float64())),  # higher = better; null unless the source gave scores
        # raw per-image scores of each scorer behind `scores` (synthetic source); null unless the source gave them
        pa.field("extra_scores", pa.map_(pa.string(), pa.list_(pa.float64()))),
    ]
)


def shard_dir(root: Path) -> Path:
    return Path(root) / SHARD_DIR


def tensors_path(root: Path, shard: int) -> Path:
    return shard_dir(root) / f"{shard:05d}.safetensors"


def index_path(root: Path, shard: int) -> Path:
    return shard_dir(root) / f"{shard:05d}.parquet"


def write_shard(root: Path, shard: int, tensors: dict, rows: list[dict], meta: dict) -> None:
    """Commit one shard: tensors first, then the index parquet (the commit marker)."""
    shard_dir(root).mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors_path(root, shard), tensors, metadata={"shard": str(shard)})
    fault_point("cache.shard_tensors")
    schema = INDEX_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_open(index_path(root, shard)) as f:
        pq.write_table(table, f)
    fault_point("cache.shard")


def committed_shards(root: Path) -> int:
    """Number of committed shards: the longest prefix 0, 1, ... whose index parquet and tensors both exist."""
    n = 0
    while index_path(root, n).is_file() and tensors_path(root, n).is_file():
        n += 1
    return n


def discard_uncommitted(root: Path, committed: int) -> None:
    """Remove shard files past the committed prefix and leftover temporaries (all ours, from a killed build)."""
    d = shard_dir(root)
    if not d.is_dir():
        return
    for p in d.iterdir():
        stem = p.name.split(".")[0]
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink()
        elif stem.isdigit() and int(stem) >= committed and p.suffix in (".parquet", ".safetensors"):
            p.unlink()


def shard_meta(root: Path, shard: int) -> dict:
    """The bookkeeping stored in a shard's parquet metadata."""
    md = pq.read_schema(index_path(root, shard)).metadata or {}
    return json.loads(md[META_KEY])


def read_index(root: Path, shards: int, columns: list[str] | None = None) -> pa.Table:
    """The index rows of shards 0..shards-1 as one table (with a `shard` column added)."""
    tables = []
    for s in range(shards):
        t = pq.read_table(index_path(root, s), columns=columns)
        tables.append(t.append_column("shard", pa.array(np.full(t.num_rows, s, dtype=np.int32))))
    if not tables:
        empty = pa.Table.from_pylist([], schema=INDEX_SCHEMA)
        empty = empty.select(columns) if columns else empty
        return empty.append_column("shard", pa.array([], pa.int32()))
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def fixed_lists(column: pa.ChunkedArray, k: int, dtype, fill) -> np.ndarray:
    """A list column whose non-null entries all have k values -> (n, k) array, `fill` where null."""
    arr = column.combine_chunks()
    out = np.full((len(arr), k), fill, dtype=dtype)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        out[valid] = arr.filter(arr.is_valid()).flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return out
