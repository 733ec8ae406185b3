"""Validation image grids during training: the same prompts and seeds each time, trained vs. base."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from diffalign.config import EvalConfig
from diffalign.models.loading import Components, build_pipeline
from diffalign.models.lora import adapters_disabled


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one image."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


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
    """Row 1: the model being trained; row 2 (LoRA only): the same UNet with adapters disabled."""
    moved = [m for m in (components.vae, *components.text_encoders) if m.device != torch.device(device)]
    for m in moved:
        m.to(device)
    was_training = unet.training
    unet.eval()
    try:
        rows = [render(components, unet, cfg, resolution, device)]
        if lora:
            with adapters_disabled(unet):
                rows.append(render(components, unet, cfg, resolution, device))
    finally:
        unet.train(was_training)
        for m in moved:
            m.to("cpu")
    grid = image_grid(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return grid
