"""Preference data: sources -> latent-pair cache (`prepare_cache`, `check_cache`) -> `LatentPairDataset`."""

from diffalign.data.cache import prepare_cache
from diffalign.data.dataset import LatentPairDataset
from diffalign.data.errors import CacheIncompleteError, CacheMismatchError, CorruptImageError, DataError
from diffalign.data.manifest import check_cache

__all__ = [
    "CacheIncompleteError",
    "CacheMismatchError",
    "CorruptImageError",
    "DataError",
    "LatentPairDataset",
    "check_cache",
    "prepare_cache",
]
