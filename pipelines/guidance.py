"""Negative-preference classifier-free guidance: which weights each branch of CFG runs.

Diffusion-NPO (Wang et al., ICLR 2025, arXiv:2505.11245; `pipeline_stable_diffusion_double_unet.py`), per step::

    ε = ε_neg(x_t, c_neg) + w · (ε_pos(x_t, c) − ε_neg(x_t, c_neg))
    positive branch: θ_base + η                 η = a preference-tuned offset (LoRA or full weights), or none
    negative branch: θ_base + α·η + β·δ         δ = the NPO / Self-NPO offset (α = 1 − merge_weight, β = 1 officially)

c_neg is whatever the pipeline encodes for the negative prompt ("" for SD1.5, zeros for SDXL's empty prompt, or the
user's negative prompt): NPO and a user negative prompt stack, as in the official code.

How it is computed. diffusers' pipelines batch CFG as one UNet call on [negative half; positive half] and then take
``uncond + w·(text − uncond)``. `BranchUNet` stands in for the pipeline's UNet during a call and runs each half with its
branch's weights, so everything else (prompt encoding, ``scale_model_input``, any scheduler, guidance rescale,
callbacks, decoding) is the diffusers pipeline's own code, unchanged. With LoRA offsets both branches are ONE UNet
whose adapter weights are switched per branch (``set_adapters``); the official code keeps two UNets. A full-weight
offset is merged once into a second UNet for the negative branch (one more UNet in memory: 3.4 GB for SD1.5's in
fp32, 5.1 GB for SDXL's in fp16).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffalign.models.errors import ModelLoadError
from diffalign.pipelines.weights import (
    add_lora_offset,
    add_unet_offset,
    base_state_dict,
    find_weights,
    load_lora_adapter,
    load_unet,
)

POSITIVE, NPO = "positive", "npo"  # adapter names


@dataclass
class GuidanceBranches:
    """The UNet and LoRA adapter weights ({name: weight}; an adapter not named runs at weight 0) of each branch."""

    positive_unet: UNet2DConditionModel
    negative_unet: UNet2DConditionModel
    positive_adapters: dict[str, float] = field(default_factory=dict)
    negative_adapters: dict[str, float] = field(default_factory=dict)
    _current: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)  # the weights each UNet runs now
    _layers: dict[int, list] = field(default_factory=dict, repr=False)  # each UNet's LoRA layers, found once

    def unet(self, branch: str) -> UNet2DConditionModel:
        """The branch's UNet with its adapter weights set: on each LoRA layer, the branch's adapters of non-zero weight
        are the active ones, at scale weight·alpha/r (peft's ``LoraLayer.set_scale``). The active list is assigned as
        peft's ``set_adapter`` assigns it, without that method's walk over every parameter's requires_grad (diffusers'
        ``set_adapters`` costs more than a toy UNet's forward); an adapter at weight 0 is not computed at all."""
        unet, adapters = (self.positive_unet, self.positive_adapters) if branch == "positive" else (self.negative_unet, self.negative_adapters)
        if getattr(unet, "peft_config", None) and self._current.get(id(unet)) != adapters:
            if id(unet) not in self._layers:
                from peft.tuners.lora import LoraLayer

                self._layers[id(unet)] = [m for m in unet.modules() if isinstance(m, LoraLayer)]
            for layer in self._layers[id(unet)]:
                active = [name for name in layer.lora_A if adapters.get(name, 0.0) != 0.0]
                for name in active:
                    layer.set_scale(name, adapters[name])
                layer._active_adapter = active
            self._current[id(unet)] = dict(adapters)
        return unet


class BranchUNet(torch.nn.Module):
    """The pipeline's UNet during an NPO-CFG call: the first half of a CFG batch runs the negative branch, the second the
    positive branch; without CFG (``guidance_scale <= 1``) the whole batch is positive. Attributes the pipeline reads
    (``config``, ``dtype``, ``device``, ``add_embedding``) are the positive UNet's."""

    def __init__(self, branches: GuidanceBranches, guided):
        super().__init__()
        self.branches = branches
        self.guided = guided  # a callable: does this call batch CFG? (the pipeline's `do_classifier_free_guidance`)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["branches"].positive_unet, name)

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict: bool = True, **kwargs):
        positive = self.branches.unet("positive")
        if not self.guided():
            out = positive(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs)[0]
        else:
            halves = [_half(sample, i) for i in (0, 1)]
            steps = [_half(timestep, i) if torch.is_tensor(timestep) and timestep.ndim and len(timestep) == len(sample) else timestep
                     for i in (0, 1)]
            embeds = [_half(encoder_hidden_states, i) for i in (0, 1)]
            added = [None if added_cond_kwargs is None else {k: _half(v, i) for k, v in added_cond_kwargs.items()} for i in (0, 1)]
            negative = self.branches.unet("negative")
            eps_neg = negative(halves[0], steps[0], embeds[0], *args, added_cond_kwargs=added[0], return_dict=False, **kwargs)[0]
            positive = self.branches.unet("positive")
            eps_pos = positive(halves[1], steps[1], embeds[1], *args, added_cond_kwargs=added[1], return_dict=False, **kwargs)[0]
            out = torch.cat([eps_neg, eps_pos])
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _half(x: torch.Tensor, i: int) -> torch.Tensor:
    return x.chunk(2)[i]


def _activate_all(unet: UNet2DConditionModel) -> None:
    """Every loaded adapter active at weight 1 (the branches then only rescale them)."""
    if getattr(unet, "peft_config", None):
        unet.set_adapters(list(unet.peft_config), [1.0] * len(unet.peft_config))


class NPOGuidanceMixin:
    """`load_npo` and the call that runs each CFG branch with its weights; mixed into diffusers' SD and SDXL pipelines."""

    branches: GuidanceBranches | None = None

    def load_npo(self, npo: str | Path | None = None, *, positive: str | Path | None = None, alpha: float = 1.0, beta: float = 1.0,
                 positive_scale: float = 1.0):
        """Put the NPO offset δ (weights at `npo`) into the negative branch, θ_base + α·η + β·δ, and the optional positive
        offset η (weights at `positive`; a LoRA's η is scaled by `positive_scale`) into the positive branch, θ_base + η.

        Either is a LoRA or a full UNet (`diffalign.pipelines.weights`). LoRAs become adapters of the pipeline's own UNet,
        switched per branch; any full UNet makes the negative branch a second, merged UNet. α = β = 0 without `positive`
        is plain CFG. Official defaults: α = 1 (``merge_weight`` 0: the whole positive offset), β = 1. Call it once per
        pipeline (on a UNet without adapters). Returns the pipeline."""
        base = self.unet
        if self.branches is not None:
            raise ModelLoadError("load_npo was already called on this pipeline; build a new one (from_pretrained or from_pipe)")
        if getattr(base, "peft_config", None):
            raise ModelLoadError("load_npo needs the pipeline's UNet without LoRA adapters; pass a positive LoRA as positive=")
        eta = find_weights(positive, "positive weights") if positive is not None else None
        delta = find_weights(npo, "NPO weights") if npo is not None else None
        merged = any(w is not None and w.kind == "unet" for w in (eta, delta))
        negative = copy.deepcopy(base) if merged else base
        base_weights = base_state_dict(base) if merged else None
        positive_unet = base
        if eta is not None and eta.kind == "lora":
            load_lora_adapter(base, eta, POSITIVE, type(self))
        if delta is not None and delta.kind == "lora":
            load_lora_adapter(base, delta, NPO, type(self))
        if merged:
            if eta is not None:
                if eta.kind == "unet":
                    positive_unet = load_unet(eta, base)
                    add_unet_offset(negative, positive_unet, base_weights, alpha)
                else:
                    add_lora_offset(negative, base, POSITIVE, alpha * positive_scale)
            if delta is not None:
                if delta.kind == "unet":
                    add_unet_offset(negative, load_unet(delta, base), base_weights, beta)
                else:
                    add_lora_offset(negative, base, NPO, beta)
                    base.delete_adapters(NPO)  # the positive branch never sees δ
            negative.requires_grad_(False).eval()
            if positive_unet is not base:  # a full positive model replaces the base UNet (the negative copy holds θ_base's part)
                self.register_modules(unet=positive_unet)
            lora_eta = {POSITIVE: positive_scale} if eta is not None and eta.kind == "lora" else {}
            _activate_all(positive_unet)
            self.branches = GuidanceBranches(positive_unet, negative, lora_eta)
        else:
            weights = {POSITIVE: alpha * positive_scale} if eta is not None else {}
            if delta is not None:
                weights[NPO] = beta
            _activate_all(base)
            self.branches = GuidanceBranches(base, base, {POSITIVE: positive_scale} if eta is not None else {}, weights)
        return self

    def to(self, *args, **kwargs):
        """diffusers' `to`, and the merged negative UNet with it (it is not a registered component)."""
        out = super().to(*args, **kwargs)
        if self.branches is not None and self.branches.negative_unet is not self.unet:
            self.branches.negative_unet.to(*args, **kwargs)
        return out

    def __call__(self, *args, **kwargs):
        if self.branches is None:  # no load_npo: the diffusers pipeline as it is
            return super().__call__(*args, **kwargs)
        branches = self.branches
        unet = self.unet
        # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's config for a component swap.
        self.__dict__["unet"] = BranchUNet(branches, lambda: self.do_classifier_free_guidance)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.__dict__["unet"] = unet
