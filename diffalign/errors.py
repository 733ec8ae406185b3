"""The error types a user can cause (bad config, missing files, bad data, unusable checkpoints).

The CLI prints these as one clear message instead of a traceback; anything else is a bug and keeps its
traceback.
"""

from diffalign.config import ConfigError
from diffalign.data import DataError
from diffalign.io import SafeLoadError
from diffalign.locks import DirectoryInUseError
from diffalign.models.loading import ModelLoadError
from diffalign.scorers.registry import ScorerConfigError
from diffalign.scorers.weights import ScorerWeightsError
from diffalign.trainers.checkpoint import CheckpointError
from diffalign.trainers.loop import TrainingError

USER_ERRORS = (ConfigError, DataError, SafeLoadError, ModelLoadError, ScorerConfigError, ScorerWeightsError, CheckpointError, TrainingError,
               DirectoryInUseError)
