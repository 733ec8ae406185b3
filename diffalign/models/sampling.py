"""Batched, seed-exact image sampling with a model's own diffusers pipeline.

Each image has its own generator seeded from its `seed`, so an image depends only on (model, prompt,
seed, sampler settings), never on how the prompts were batched. `load_trained_unet` puts a training run's
exported weights (LoRA or full UNet) on the base components, for sampling the trained model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image

from diffalign.models.loading import Components, ModelLoadError, build_pipeline
from diffalign.models.lora import LORA_WEIGHT_NAME


@torch.no_grad()
def sample_images(
    components: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    unet=None,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    resolution: int = 32,
    batch_size: int = 64,
    progress=None,
) -> list[Image.Image]:
    """One image per (prompt, seed) from the components' pipeline (DDIM, η = 0; optionally another UNet): `sample_with`."""
    pipe = build_pipeline(components, unet)
    return sample_with(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       height=resolution, width=resolution, batch_size=batch_size, progress=progress)


@torch.no_grad()
def sample_with(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 64,
    progress=None,
) -> list[Image.Image]:
    """One image per (prompt, seed) from a diffusers text-to-image pipeline, classifier-free guidance; `progress` is
    called with the count done. Each image's starting noise comes from its own generator seeded with its seed (on the
    CPU), so an image does not depend on the batch it was drawn in."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        negative = None if negative_prompt is None else [negative_prompt] * len(chunk)
        out = pipe(chunk, negative_prompt=negative, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   height=height, width=width, generator=generators)
        images.extend(out.images)
        if progress is not None:
            progress(len(chunk))
    return images


def load_trained_unet(components: Components, final_dir: str | Path) -> UNet2DConditionModel:
    """The UNet a training run exported, ready to pass as `sample_images(..., unet=...)` or to `build_pipeline`.

    `final_dir` is `TrainResult.final_dir` of `diffalign.trainers.loop.train` (``<train.output_dir>/final``):
    - a LoRA run left ``pytorch_lora_weights.safetensors`` (diffusers format, the peft config as metadata):
      the adapter is loaded, unfused, into a deep COPY of ``components.unet``; the base UNet is never modified,
      so the base model can still be sampled from the same components (a real SDXL UNet is copied once: budget
      its memory);
    - a full fine-tune left ``unet/`` (``save_pretrained``): that UNet is loaded as saved (its own dtype), on the
      base UNet's device.
    ``config.yaml`` beside the weights must name the same base model as ``components.source`` (a LoRA on another
    base would load without complaint and sample garbage). The UNet is returned in eval mode; its samples equal those of
    the in-memory trained UNet bit for bit (tests/test_load_trained_unet.py).
    Raises `ModelLoadError` if `final_dir` holds neither kind of weights or was trained from another base.
    """
    final_dir = Path(final_dir)
    _check_base(components, final_dir)
    lora_file = final_dir / LORA_WEIGHT_NAME
    if lora_file.is_file():
        if getattr(components.unet, "peft_config", None):
            raise ModelLoadError(f"{final_dir}: components.unet already carries LoRA adapters; pass the base model's components")
        unet = unet_with_lora(components.unet, lora_file)
        for name, p in unet.named_parameters():  # as training leaves a LoRA UNet: the base frozen, the adapters trainable
            p.requires_grad_(".lora_" in name)
    elif (final_dir / "unet" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(final_dir / "unet", local_files_only=True, use_safetensors=True).to(components.unet.device)
        unet.requires_grad_(True)  # as training leaves a fully fine-tuned UNet
    else:
        raise ModelLoadError(f"{final_dir}: no trained weights ({LORA_WEIGHT_NAME} or unet/config.json); is it a run's final/ directory?")
    # requires_grad is set as training leaves it: on CPU torch picks some kernels (3-D Linear) by the weights'
    # requires_grad, so only these flags give samples equal to the in-memory trained model's bit for bit. Sampling runs
    # under no_grad, so the flags cost nothing there.
    return unet.eval()


def unet_with_lora(base: UNet2DConditionModel, lora_file: Path) -> UNet2DConditionModel:
    """A deep copy of `base` with the diffusers-format LoRA file loaded as adapter 'default' (unfused, frozen); raises
    `ModelLoadError` unless every LoRA tensor of the file found its module."""
    unet = copy.deepcopy(base)
    unet.requires_grad_(False)
    unet.load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name, prefix="unet", adapter_name="default", local_files_only=True)
    _check_all_loaded(unet, lora_file)
    return unet


def _check_all_loaded(unet: UNet2DConditionModel, lora_file: Path) -> None:
    """Every LoRA tensor of the file found its module (peft only warns about the ones it cannot place)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        saved = sum(1 for k in f.keys() if k.startswith("unet."))
    placed = sum(1 for n, _ in unet.named_parameters() if ".lora_" in n)
    if saved != placed:
        raise ModelLoadError(f"{lora_file}: {saved} LoRA tensors, but {placed} found their UNet module (another base model?)")


def _check_base(components: Components, final_dir: Path) -> None:
    """Refuse weights trained from another base model than `components` (read from the run's ``config.yaml``)."""
    saved = final_dir / "config.yaml"
    if not saved.is_file():
        raise ModelLoadError(f"{final_dir}: no config.yaml (a diffalign run's final/ directory holds one beside the weights)")
    trained_from = (yaml.safe_load(saved.read_text()) or {}).get("model", {}).get("pretrained")
    if not _same_model_ref(trained_from, components.source):
        raise ModelLoadError(f"{final_dir}: trained from model.pretrained={trained_from!r}, but the components are {components.source!r}")


def _same_model_ref(a: str | None, b: str) -> bool:
    """Two model references name the same model: equal strings, or paths to the same directory."""
    if a == b:
        return True
    return a is not None and Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
