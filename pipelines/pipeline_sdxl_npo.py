"""Stable Diffusion XL with negative-preference CFG (Diffusion-NPO / Self-NPO weights in the negative branch).

    pipe = StableDiffusionXLNPOPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    pipe.load_npo("sdxl_beta2k_2kiter.safetensors", alpha=1.0, beta=1.0)
    image = pipe("a cat wearing a hat", guidance_scale=5.0, num_inference_steps=25).images[0]

Every argument of `diffusers.StableDiffusionXLPipeline.__call__` works as there; `diffalign.pipelines.guidance` says
what each branch runs. The negative branch gets the pipeline's negative conditioning: zero embeddings for an empty
negative prompt (``force_zeros_for_empty_prompt``, SDXL base), or the user's negative prompt and time ids.
"""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from diffalign.pipelines.guidance import NPOGuidanceMixin


class StableDiffusionXLNPOPipeline(NPOGuidanceMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` whose CFG branches run θ_base + η (positive) and θ_base + α·η + β·δ (negative)."""
