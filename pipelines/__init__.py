"""Negative-preference CFG pipelines for SD and SDXL (installed as `diffalign.pipelines`).

The NPO pipelines arrive with the Diffusion-NPO issue; this package exists now so the `diffalign.pipelines`
namespace mapping (package-dir in pyproject.toml) is installed and tested from the start.
"""
