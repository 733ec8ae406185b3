"""The weights of NPO-CFG's two branches, read from local paths in the formats they ship in.

Notation (Diffusion-NPO, research/npo_grpo.md §1(c)): θ_base the pipeline's UNet; η = θ_pos − θ_base a
preference-tuned *positive* offset; δ the NPO (or Self-NPO) offset. A reference to weights is one of:

- a LoRA: a ``.safetensors`` file, or a directory holding ``pytorch_lora_weights.safetensors`` (diffalign's
  ``final/``, diffusers' ``save_lora_weights``). Any format diffusers' ``lora_state_dict`` reads: diffusers/peft
  keys (``unet.….lora_A.weight``), the older diffusers keys the official Diffusion-NPO scripts write
  (``unet.….lora.down.weight``: ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` then
  ``save_lora_weights``, train_sd15.py L956-959, train_sdxl.py L1109-1116), kohya/ComfyUI keys (``lora_unet_…``);
- a full UNet: a directory with ``config.json`` and its weights (``UNet2DConditionModel.save_pretrained``, as
  Self-NPO's train.py L1231 saves), or a directory whose ``unet/`` is one (diffalign's full fine-tune ``final/``, a
  diffusers pipeline folder). A full UNet is an offset through θ_full − θ_base.

Weights trained by diffalign's ``npo`` or ``self_npo`` are *negative models*: the run's ``config.yaml`` beside them
names the method, and `is_negative_model` reads it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from diffusers import UNet2DConditionModel

from diffalign.config.methods import NEGATIVE_METHODS
from diffalign.models.errors import ModelLoadError
from diffalign.models.lora import LORA_WEIGHT_NAME
from diffalign.models.quiet import quiet_loading


@dataclass(frozen=True)
class Weights:
    """Where one offset's weights are: a LoRA file or a full UNet directory."""

    kind: Literal["lora", "unet"]
    path: Path  # the LoRA's .safetensors file, or the UNet directory (config.json + weights)


def find_weights(ref: str | Path, what: str = "weights") -> Weights:
    """Resolve a user's path to a LoRA file or a UNet directory; a `ModelLoadError` naming `what` otherwise."""
    path = Path(ref)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{what} {path}: a LoRA must be a .safetensors file (pickled .bin/.ckpt files are not read)")
        return Weights("lora", path)
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return Weights("lora", path / LORA_WEIGHT_NAME)
        for unet_dir in (path, path / "unet"):
            if (unet_dir / "config.json").is_file():
                return Weights("unet", unet_dir)
        raise ModelLoadError(f"{what} {path}: neither a LoRA ({LORA_WEIGHT_NAME}) nor a UNet (config.json, or unet/config.json)")
    raise ModelLoadError(f"{what} {path}: no such file or directory")


def is_negative_model(ref: str | Path) -> bool:
    """Whether diffalign trained these weights as a negative model (``npo``, ``self_npo``): read from the run's
    ``config.yaml`` in the directory given, beside the file given, or above a ``unet/`` folder."""
    path = Path(ref)
    for folder in (path, path.parent, path.parent.parent) if path.is_dir() else (path.parent,):
        saved = folder / "config.yaml"
        if saved.is_file():
            method = ((yaml.safe_load(saved.read_text()) or {}).get("method") or {}).get("name")
            return method in NEGATIVE_METHODS
    return False


def load_lora_adapter(unet: UNet2DConditionModel, weights: Weights, adapter_name: str, pipeline_cls) -> None:
    """Load a LoRA file into `unet` as adapter `adapter_name`, through `pipeline_cls`'s format conversion; raises unless
    every UNet LoRA tensor of the file found its module (peft only warns about the ones it cannot place)."""
    with quiet_loading():
        state_dict, alphas, metadata = pipeline_cls.lora_state_dict(str(weights.path), return_lora_metadata=True)
    other = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith("unet.")})
    if other:
        raise ModelLoadError(f"{weights.path}: LoRA weights for {', '.join(other)}; NPO-CFG applies UNet LoRAs only")
    try:
        with quiet_loading(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two adapters on one UNet is the point here
            pipeline_cls.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name=adapter_name, metadata=metadata)
    except (RuntimeError, ValueError) as e:  # shapes of another base model
        raise ModelLoadError(f"{weights.path}: this LoRA does not fit the pipeline's UNet (another base model?): {str(e)[:300]}") from e
    placed = sum(1 for n, _ in unet.named_parameters() if f".{adapter_name}." in n and ".lora_" in n)
    saved = sum(1 for k in state_dict if ".lora" in k and not k.endswith(".alpha"))
    if placed == 0 or placed != saved:
        raise ModelLoadError(f"{weights.path}: {saved} LoRA tensors, but {placed} found their UNet module (another base model?)")


def load_unet(weights: Weights, like: UNet2DConditionModel) -> UNet2DConditionModel:
    """A full UNet on `like`'s device and dtype, refused unless its parameters have `like`'s names and shapes."""
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(weights.path, torch_dtype=like.dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{weights.path}: cannot load a UNet ({e})") from e
    base = base_state_dict(like)
    mine = unet.state_dict()
    if mine.keys() != base.keys() or any(mine[k].shape != base[k].shape for k in base):
        raise ModelLoadError(f"{weights.path}: this UNet's parameters differ from the pipeline's (another architecture?)")
    return unet.to(like.device).eval().requires_grad_(False)


def base_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's own weights by their plain names, without LoRA tensors (peft's ``base_layer.`` removed)."""
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}


@torch.no_grad()
def add_lora_offset(target: UNet2DConditionModel, source: UNet2DConditionModel, adapter_name: str, scale: float) -> None:
    """target += scale · ΔW for each module of `source` carrying adapter `adapter_name` (ΔW = peft's
    ``get_delta_weight``: B·A·lora_alpha/r, the offset the LoRA adds when fused at weight 1)."""
    from peft.tuners.lora import LoraLayer

    params = dict(target.named_parameters())
    for name, module in source.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.set_scale(adapter_name, 1.0)  # the file's own alpha/r, whatever weight set_adapters gave it
            params[f"{name}.weight"].add_(module.get_delta_weight(adapter_name).to(params[f"{name}.weight"]), alpha=scale)


@torch.no_grad()
def add_unet_offset(target: UNet2DConditionModel, full: UNet2DConditionModel, base: dict[str, torch.Tensor], scale: float) -> None:
    """target += scale · (θ_full − θ_base), parameter by parameter."""
    own = full.state_dict()
    for name, p in target.named_parameters():
        p.add_(own[name].to(p) - base[name].to(p), alpha=scale)


def random_lora_like(weights: Weights, out_file: Path, seed: int) -> Path:
    """A control offset: a LoRA with `weights`' keys, shapes and metadata, Gaussian entries, its up matrices scaled so
    that the dense offset Σ‖up·down‖²_F has the same norm as the original's (alpha/r is the same for both)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights.path))
    with safe_open(str(weights.path), framework="pt") as f:
        metadata = f.metadata()
    g = torch.Generator().manual_seed(seed)
    fresh = {k: torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) for k, v in tensors.items()}
    pairs = [(k, k.replace("lora_A", "lora_B").replace("lora.down", "lora.up")) for k in tensors if "lora_A" in k or "lora.down" in k]
    if not pairs or any(up not in tensors for _, up in pairs):
        raise ModelLoadError(f"{weights.path}: no matching LoRA down/up pairs to imitate")

    def norm(t: dict[str, torch.Tensor]) -> float:
        return sum(float((t[up].float().flatten(1) @ t[down].float().flatten(1)).square().sum()) for down, up in pairs) ** 0.5

    scale = norm(tensors) / norm(fresh)
    for _, up in pairs:
        fresh[up] = (fresh[up].float() * scale).to(tensors[up].dtype)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(fresh, str(out_file), metadata=metadata)
    return out_file
