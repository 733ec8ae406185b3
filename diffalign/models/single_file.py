"""Single-file checkpoints: one ``.safetensors`` holding UNet, VAE and text encoders, as community models ship.

The file uses the original Stable Diffusion key layout (``model.diffusion_model.*`` for the UNet,
``first_stage_model.*`` for the VAE, ``cond_stage_model.transformer.*`` for the SD1.5 text encoder,
``conditioner.embedders.{0,1}.*`` for SDXL's two). diffusers' ``from_single_file`` converts it; the
component configs, tokenizers and scheduler come from ``model.single_file_config``: a local diffusers
pipeline directory or a hub id (default: diffusers' reference repository for the family, read from the
local cache when ``HF_HUB_OFFLINE`` is set). The family is read from the file's header before any weight
loads. Pickle formats (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused: unpickling a downloaded file
can run code, so convert it to safetensors first.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.config.base import PICKLE_SUFFIXES, is_single_file
from diffalign.models.errors import ModelLoadError
from diffalign.models.quiet import quiet_loading

__all__ = ["is_single_file", "load_single_file_pipeline", "single_file_family"]

UNET_PREFIX = "model.diffusion_model."
FAMILY_PREFIXES = {"sdxl": "conditioner.embedders.", "sd15": "cond_stage_model."}  # the text encoders' key prefix


def single_file_family(path: str | Path, key: str = "model.pretrained") -> str:
    """'sd15' or 'sdxl' from the checkpoint's key names (the header only), or a `ModelLoadError` naming `key`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{key}: '{path}' is a pickle checkpoint, which can run code when loaded; diffalign reads "
                             "single-file checkpoints as .safetensors only (convert it first, or use the model's safetensors release)")
    if not path.is_file():
        raise ModelLoadError(f"{key}: single-file checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{key}: '{path}' is not a readable safetensors file: {e}") from None
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelLoadError(f"{key}: '{path}' has no '{UNET_PREFIX}*' keys: not a Stable Diffusion single-file checkpoint "
                             "(a LoRA goes to --lora / model.init_from, a diffusers UNet to --unet)")
    for family, prefix in FAMILY_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return family
    raise ModelLoadError(f"{key}: '{path}' has a UNet but no text encoder keys ({' or '.join(FAMILY_PREFIXES.values())}*): "
                         "diffalign loads whole SD1.5 / SDXL checkpoints")


def load_single_file_pipeline(path: str | Path, config: str | None = None, key: str = "model.pretrained"):
    """The diffusers pipeline of a single-file checkpoint (SD1.5 or SDXL by its keys), configs from `config`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(path, key)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    local_config = config is not None and Path(config).is_dir()
    kwargs = {"config": config, "local_files_only": offline or local_config}
    if family == "sd15":
        cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        cls = StableDiffusionXLPipeline
    try:
        with quiet_loading():
            return family, cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as e:
        hint = "" if config else (" (its component configs come from diffusers' reference repository; offline, give a local "
                                  "diffusers pipeline directory of the same family as model.single_file_config / --model-config)")
        raise ModelLoadError(f"{key}: could not load the single-file checkpoint '{path}'{hint}: {e}") from None
