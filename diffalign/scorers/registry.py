"""Scorers by canonical name: a plain mapping from name to factory (no plugin system).

`available()` lists the names that can be built in this installation; `load_scorer(name, **options)`
builds one. Factories import their heavy dependencies lazily.
"""

from __future__ import annotations

from collections.abc import Callable

from diffalign.scorers.base import Scorer


def _toy_checklist(**options) -> Scorer:
    from diffalign.toy.checklist import toy_checklist_scorer

    return toy_checklist_scorer(**options)


FACTORIES: dict[str, Callable[..., Scorer]] = {
    "toy-checklist": _toy_checklist,
}


def _toy_checklist_identity(**options) -> dict:
    from diffalign.toy.checklist import toy_checklist_identity

    return toy_checklist_identity(options.get("graded", True))


IDENTITIES: dict[str, Callable[..., dict]] = {
    "toy-checklist": _toy_checklist_identity,
}


def scorer_identity(name: str, **options) -> dict:
    """What decides a scorer's scores (config, thresholds, weight files), without loading its model: caches of
    scored data record it, so a changed scorer invalidates them."""
    if name not in FACTORIES:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available())}")
    return {"name": name, **IDENTITIES[name](**options)}


def available() -> list[str]:
    return sorted(FACTORIES)


def load_scorer(name: str, **options) -> Scorer:
    if name not in FACTORIES:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available())}")
    return FACTORIES[name](**options)
