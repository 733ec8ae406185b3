"""Shipped YAML recipes (package data): `diffalign train sdxl_dpo` finds them by name."""
