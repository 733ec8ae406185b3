"""Preference scorers behind one interface (`Scorer`), a checklist framework, and a registry by name."""

from diffalign.scorers.base import Preference, Scorer, bradley_terry
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question
from diffalign.scorers.registry import available, load_scorer

__all__ = ["Checklist", "ChecklistScorer", "Preference", "Question", "Scorer", "available", "bradley_terry", "load_scorer"]
