"""Data sources: each yields `SourceItem`s (caption, K images, label / ranks / scores; K = 1 and no signal for the
captioned-image sources)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffalign.config import CaptionsSource, DemoSource, FolderSource, PickapicSource, SyntheticSource, ToyScenesSource
from diffalign.config.sections import Hpdv2Source
from diffalign.data.errors import DataError
from diffalign.data.sources.base import Source, SourceItem, validate_item
from diffalign.data.sources.captions import CaptionedFolder, ToyScenes
from diffalign.data.sources.demo import DemoPairs, write_demo_parquet
from diffalign.data.sources.folder import FolderJsonl
from diffalign.data.sources.hpdv2 import Hpdv2Json
from diffalign.data.sources.pickapic import PickapicParquet
from diffalign.data.sources.synthetic import SyntheticGenerator, win_rate_phi

if TYPE_CHECKING:
    from diffalign.config import Config


def open_source(cfg: PickapicSource | FolderSource | Hpdv2Source | DemoSource | SyntheticSource, config: "Config | None" = None) -> Source:
    """The source described by `data.source`; raises `DataError` for missing paths or columns.

    `config` (the whole config) is needed by the synthetic source: its default generating model is
    `model` and its default resolution `data.resolution`. Opening a source loads no model.
    """
    if isinstance(cfg, PickapicSource):
        return PickapicParquet(cfg.path)
    if isinstance(cfg, FolderSource):
        return FolderJsonl(cfg.root, cfg.jsonl)
    if isinstance(cfg, Hpdv2Source):
        return Hpdv2Json(cfg.path, cfg.root)
    if isinstance(cfg, DemoSource):
        return DemoPairs(cfg.num_pairs, cfg.image_size, cfg.seed)
    if isinstance(cfg, CaptionsSource):
        return CaptionedFolder(cfg.root)
    if isinstance(cfg, ToyScenesSource):
        return ToyScenes(cfg.images_per_caption, cfg.image_size, cfg.seed)
    if isinstance(cfg, SyntheticSource):
        if config is None:
            raise DataError("data.source: the synthetic source needs the whole config (call open_source(cfg.data.source, cfg))")
        return SyntheticGenerator(cfg, config.model, config.data.resolution)
    raise TypeError(f"unknown source config {type(cfg).__name__}")


__all__ = [
    "CaptionedFolder",
    "ToyScenes",
    "DemoPairs",
    "FolderJsonl",
    "Hpdv2Json",
    "PickapicParquet",
    "Source",
    "SourceItem",
    "SyntheticGenerator",
    "open_source",
    "validate_item",
    "win_rate_phi",
    "write_demo_parquet",
]
