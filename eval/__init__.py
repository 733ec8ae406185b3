"""Folder scoring, win-rates, prompt sets and the alignment benchmark (installed as `diffalign.eval`).

The scorers and win-rate issue fills this package; it exists now so the `diffalign.eval` namespace
mapping (package-dir in pyproject.toml) is installed and tested from the start.
"""
