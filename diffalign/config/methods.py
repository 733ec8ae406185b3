"""One config class per training method, and the name -> class table every other part derives from.

Each class documents its paper in the `name` field's description and its hyperparameters field by field
(with the official value and a typical range). `METHOD_CONFIGS` is the one list of method names on the
config side: the `method` union of `Config`, the CLI's help and the recipe checks are built from it. The
trainers keep the matching name -> method-class table (`diffalign.trainers.methods.METHODS`); a test
checks that both tables hold the same names. Adding a method: a class here and one line in the table.

β convention (stated once, written into the saved config of every method with a `beta` field)::

    loss = -log σ(-β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]),   e = per-sample MSE mean over C,H,W

This is the official Diffusion-DPO convention (``scale_term = -0.5 * beta_dpo``), so β = 5000 here means
what β = 5000 means in SalesforceAIResearch/DiffusionDPO and β = 2500 in diffusers' SD1.5 DPO script.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffalign.config.base import Section

BETA_CONVENTION = (
    "beta convention: loss = -log sigmoid(-beta/2 * [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]), "
    "e = per-sample MSE mean over C,H,W"
)


class DPOMethod(Section):
    name: Literal["dpo"] = Field("dpo", description="Method tag: Diffusion-DPO (Wallace et al., 2023, arXiv:2311.12908).")
    beta: float = Field(
        5000.0,
        gt=0,
        description="β in loss = -log σ(-β/2·Δ), Δ = (e_θ(w)-e_ref(w)) - (e_θ(l)-e_ref(l)), e = per-sample MSE mean over C,H,W. "
        "Official: 5000 (SD1.5 paper value 2000). Typical range 2000-5000.",
    )


class SFTMethod(Section):
    name: Literal["sft"] = Field("sft", description="Method tag: supervised fine-tuning on the preferred image only (the official `--sft` baseline).")


METHOD_CONFIGS: dict[str, type[Section]] = {
    "dpo": DPOMethod,
    "sft": SFTMethod,
}


def uses_beta(method: Section) -> bool:
    """Whether a method config follows the β convention above (it has a `beta` field)."""
    return "beta" in type(method).model_fields
