"""Validation image grids during training: the same prompts and seeds each time, trained vs. base."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from diffalign.config import EvalConfig
from diffalign.imagegrid import paint_grid
from diffalign.models.devices import on_device
from diffalign.models.loading import Components, build_pipeline
from diffalign.models.lora import adapters_disabled


@torch.no_grad()
def render(components: Components, unet, cfg: EvalConfig, resolution: int, device) -> list[Image.Image]:
    pipe = build_pipeline(components, unet)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in cfg.prompts:
        g = torch.Generator().manual_seed(cfg.seed)
        out = pipe(prompt, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=resolution, width=resolution, generator=g)
        images.append(out.images[0])
    return images


def validation_grid(components: Components, unet, cfg: EvalConfig, resolution: int, device, lora: bool, out_path: Path) -> Image.Image:
    """Row 1: the model being trained; row 2 (LoRA only): the same UNet with adapters disabled.

    The VAE and text encoders are lent to `device` for the sampling and go back where they were."""
    was_training = unet.training
    unet.eval()
    try:
        with on_device([components.vae, *components.text_encoders], device):
            rows = [render(components, unet, cfg, resolution, device)]
            if lora:
                with adapters_disabled(unet):
                    rows.append(render(components, unet, cfg, resolution, device))
    finally:
        unet.train(was_training)
    grid = paint_grid(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return grid
