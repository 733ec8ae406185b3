"""Preference sources: each yields `SourceItem`s (caption, K images, label / ranks / scores)."""

from __future__ import annotations

from diffalign.config import DemoSource, FolderSource, PickapicSource
from diffalign.data.sources.base import Source, SourceItem, validate_item
from diffalign.data.sources.demo import DemoPairs, write_demo_parquet
from diffalign.data.sources.folder import FolderJsonl
from diffalign.data.sources.pickapic import PickapicParquet


def open_source(cfg: PickapicSource | FolderSource | DemoSource) -> Source:
    """The source described by `data.source`; raises `DataError` for missing paths or columns."""
    if isinstance(cfg, PickapicSource):
        return PickapicParquet(cfg.path)
    if isinstance(cfg, FolderSource):
        return FolderJsonl(cfg.root, cfg.jsonl)
    if isinstance(cfg, DemoSource):
        return DemoPairs(cfg.num_pairs, cfg.image_size, cfg.seed)
    raise TypeError(f"unknown source config {type(cfg).__name__}")


__all__ = ["DemoPairs", "FolderJsonl", "PickapicParquet", "Source", "SourceItem", "open_source", "validate_item", "write_demo_parquet"]
