"""Stable Diffusion 1.5 with negative-preference CFG (Diffusion-NPO / Self-NPO weights in the negative branch).

    pipe = StableDiffusionNPOPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_npo("sd15_beta500_2kiter.safetensors", positive="outputs/sd15_dpo/final", alpha=1.0, beta=1.0)
    image = pipe("a cat wearing a hat", guidance_scale=7.5, num_inference_steps=25).images[0]

Every argument of `diffusers.StableDiffusionPipeline.__call__` works as there; `diffalign.pipelines.guidance` says
what each branch runs. Without `load_npo` the pipeline is plain CFG.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from diffalign.pipelines.guidance import NPOGuidanceMixin


class StableDiffusionNPOPipeline(NPOGuidanceMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` whose CFG branches run θ_base + η (positive) and θ_base + α·η + β·δ (negative)."""
