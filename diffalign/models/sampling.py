"""Batched, seed-exact image sampling with a model's own diffusers pipeline.

Each image has its own generator seeded from its `seed`, so an image depends only on (model, prompt,
seed, sampler settings), never on how the prompts were batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from diffalign.models.loading import Components, build_pipeline


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
    """One image per (prompt, seed), DDIM (η = 0), classifier-free guidance; `progress` is called with the count done."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe = build_pipeline(components, unet)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        out = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=resolution, width=resolution, generator=generators)
        images.extend(out.images)
        if progress is not None:
            progress(len(chunk))
    return images
