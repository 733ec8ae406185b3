"""Negative-preference CFG pipelines for SD1.5 and SDXL (installed as `diffalign.pipelines`).

`StableDiffusionNPOPipeline` and `StableDiffusionXLNPOPipeline` are diffusers' pipelines whose negative branch runs
θ_base + α·η + β·δ (`load_npo`; `diffalign.pipelines.guidance` has the formula and how the branches switch weights).
Names are imported on first use, so ``import diffalign.pipelines`` does not load torch.
"""

from importlib import import_module

_WHERE = {
    "StableDiffusionNPOPipeline": "pipeline_sd_npo",
    "StableDiffusionXLNPOPipeline": "pipeline_sdxl_npo",
    "BranchUNet": "guidance",
    "GuidanceBranches": "guidance",
    "NPOGuidanceMixin": "guidance",
    "Weights": "weights",
    "find_weights": "weights",
    "is_negative_model": "weights",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'diffalign.pipelines' has no attribute {name!r}")
    return getattr(import_module(f"diffalign.pipelines.{_WHERE[name]}"), name)
