"""What every config module shares: the error type, the strict section base and the built-in model names."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"
BUILTIN_TINY_SD15 = "builtin:tiny-sd15"
BUILTIN_TOY = "builtin:toy"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the dotted key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
