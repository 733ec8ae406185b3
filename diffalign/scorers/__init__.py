"""Preference scorers behind one interface (`Scorer`), a checklist framework, and a registry by name."""

from diffalign.scorers.base import ModelScorer, Preference, Scorer, ScorerConfigError, bradley_terry
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question
from diffalign.scorers.registry import available, load_scorer, load_scorers, scorer_identity
from diffalign.scorers.weights import ScorerWeightsError

__all__ = ["Checklist", "ChecklistScorer", "ModelScorer", "Preference", "Question", "Scorer", "ScorerConfigError", "ScorerWeightsError",
           "available", "bradley_terry", "load_scorer", "load_scorers", "scorer_identity"]
