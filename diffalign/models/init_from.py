"""`model.init_from`: start training from a previous output, which is then both the policy's start and the reference.

Accepted: a diffalign run's ``final/`` directory (a LoRA, merged into the base UNet, or a full ``unet/``), a diffusers
UNet directory (``config.json`` + weights), or a diffusers-format LoRA safetensors file. A LoRA is fused into the base
weights, so a new LoRA trains on top of it and "adapters disabled" is the merged model; a full fine-tune copies the
merged UNet as its frozen reference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffalign.models.errors import ModelLoadError
from diffalign.models.loading import Components
from diffalign.models.lora import LORA_WEIGHT_NAME
from diffalign.models.quiet import quiet_loading
from diffalign.models.sampling import load_trained_unet, unet_with_lora

KEY = "model.init_from"


def start_from(components: Components, init_from: str | Path) -> Components:
    """`components` with its UNet replaced by the previous output's merged weights (the caller's object is untouched)."""
    path = Path(init_from)
    base = components.unet
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{KEY}: {path} is not a .safetensors LoRA file (pickled .bin files are not loaded)")
        unet = _merged(unet_with_lora(base, path))
    elif (path / LORA_WEIGHT_NAME).is_file() or (path / "unet" / "config.json").is_file():
        unet = load_trained_unet(components, path)  # a run's final/: checks it was trained from the same base
        unet = _merged(unet) if (path / LORA_WEIGHT_NAME).is_file() else unet
    elif (path / "config.json").is_file():
        try:
            with quiet_loading():
                unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{KEY}: cannot load a UNet from {path} (safetensors weights only): {e}") from None
    elif not path.exists():
        raise ModelLoadError(f"{KEY}: {path} does not exist")
    else:
        raise ModelLoadError(
            f"{KEY}: {path} holds no weights to start from (expected a run's final/ directory, a UNet directory with "
            f"config.json, or a LoRA .safetensors file)"
        )
    _check_same_architecture(unet, base, path)
    unet = unet.to(device=base.device, dtype=base.dtype).requires_grad_(False).train(base.training)
    return dataclasses.replace(components, unet=unet)


def _merged(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Fuse the loaded LoRA into the base weights and remove the adapter layers."""
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet


def _check_same_architecture(unet: UNet2DConditionModel, base: UNet2DConditionModel, path: Path) -> None:
    mine, theirs = base.state_dict(), unet.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        differ = sorted(k for k in mine.keys() ^ theirs.keys())[:3] or [k for k in mine if mine[k].shape != theirs[k].shape][:3]
        raise ModelLoadError(f"{KEY}: {path} is not a UNet of model.pretrained's architecture (differs in {differ})")
    if any(not torch.isfinite(t).all() for t in theirs.values() if t.is_floating_point()):
        raise ModelLoadError(f"{KEY}: {path} holds non-finite weights")
