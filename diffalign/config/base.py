"""What every config module shares: the error type, the strict section base, the built-in model names and their checks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"
BUILTIN_TINY_SD15 = "builtin:tiny-sd15"
BUILTIN_TOY = "builtin:toy"
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = (BUILTIN_TINY_SDXL, BUILTIN_TINY_SD15, BUILTIN_TOY)


def check_builtin(ref: str) -> str:
    """`ref`, unless it is a 'builtin:' name that is not one of `BUILTIN_MODELS` (ValueError listing them)."""
    if ref.startswith(BUILTIN_PREFIX) and ref not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model; the builtin models are {', '.join(BUILTIN_MODELS)}")
    return ref


def check_separate_vae(pretrained: str, vae: str | None) -> str | None:
    """`vae`, unless a builtin model is given one (ValueError): a builtin's UNet works in its own VAE's latent space
    (the toy model was trained on its VAE's latents; the tiny pipelines' VAE has spatial factor 4)."""
    if vae is not None and pretrained.startswith(BUILTIN_PREFIX):
        raise ValueError(f"{pretrained} uses its own VAE and cannot take a separate one; remove model.vae, or set "
                         "model.pretrained to a diffusers directory or hub id")
    return vae


SINGLE_FILE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoint formats that are refused (unpickling runs code)


def is_single_file(ref: str) -> bool:
    """`ref` names a single-file checkpoint rather than a pipeline directory, hub id or builtin model."""
    return ref.lower().endswith((SINGLE_FILE_SUFFIX, *PICKLE_SUFFIXES))


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the dotted key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
