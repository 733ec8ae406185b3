"""Error types of the data layer; every message names the file, item or field at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Preference data or a cache that cannot be used as given (missing file, bad line, empty result...)."""


class CorruptImageError(DataError):
    """An image that cannot be decoded safely; `reason` says why (truncated, too large, unknown format...)."""

    def __init__(self, reason: str, where: str | None = None):
        self.reason = reason
        self.where = where
        super().__init__(f"{where}: {reason}" if where else reason)


class CacheMismatchError(DataError):
    """The cache at `cache_dir` cannot serve this configuration; the message lists each differing field."""


class CacheIncompleteError(CacheMismatchError):
    """The cache is missing or its build has not finished (no manifest.json); run `prepare_cache` first."""
