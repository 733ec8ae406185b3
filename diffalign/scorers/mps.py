"""MPS, the multi-dimensional preference score (Zhang et al., CVPR 2024; Kwai-Kolors/MPS), offline.

Architecture (``trainer/models/clip_model.py``, ``trainer/models/cross_modeling.py``; the same files are
vendored in modelscope/DiffSynth-Studio ``diffsynth/extensions/ImageQualityMetric/trainer/models``): a
transformers CLIP-H (``XCLIPModel``) plus ``Cross_model(dim=1024, layer_num=4, heads=16)`` (dim_head 64,
ff_mult 4). XCLIPModel returns token sequences, not only pooled embeddings::

    T = W_txt · final_layer_norm(text encoder(c))        (B, 77, D)   every prompt token, projected
    t = T[argmax(input_ids)]                             (B, D)       legacy argmax EOS pooling
    I = W_img · vision encoder(x)                        (B, 257, D)  pre-``post_layernorm`` tokens, projected

The text encoder sees only ``input_ids`` (no padding mask), as in the official code. A condition string
q (the overall one lists "light, color, ..., word, things.") selects the prompt tokens the image attends
to (``eval_overall_mps_on_hpdv2.py:infer_one_sample``)::

    s_i  = max_j <T_i, Q_j> / max_i' max_j <T_i', Q_j>     Q = the condition's T, 77 tokens
    m_i  = 0 if s_i > τ else −∞                            τ = ``mask_threshold``
    v    = Cross_model(I, T, m)[:, 0]                      query = image tokens, context = prompt tokens
    MPS  = exp(logit_scale) · cos(t, v)
    P(a ≻ b) = softmax([MPS_a, MPS_b])_0 = σ(MPS_a − MPS_b)   (README ``infer_example``)

The maximum is taken per prompt: the official scripts score one prompt at a time, so their batch-wide
``sim.max()`` is the per-prompt one. τ = 0.3 in the official eval scripts and DiffSynth (the default
here); ``CLIPModel.forward`` (training, the README's pairwise example, imscore) uses τ = 0.01.

Each of the 4 cross layers is ``[Residual(CrossAttention(parallel_ff=True)), Residual(ParallelTransformerBlock)]``
with residual ``x + f(x)``. CrossAttention: pre-LayerNorm on the queries only, multi-query attention
(``heads`` query heads, one shared key/value head of ``dim_head``), q scaled by dim_head^-½, the mask added
to the logits, plus a parallel SwiGLU feed-forward of the normalised queries. ParallelTransformerBlock:
pre-LayerNorm, one fused projection to (q, k, v, ff), rotary embeddings on q and k, multi-query
self-attention without a mask, out = attn_out(attention) + ff_out(SwiGLU(ff)). SwiGLU(x, g) = silu(g)·x.
LayerNorms have a weight parameter and a zero *buffer* bias (both saved). ``rotary_emb.inv_freq`` is
read from the file.

Dimensions: ``overall`` uses the official condition string (README, eval scripts). ``aesthetics``,
``quality`` and ``semantic`` use DiffSynth-Studio's narrower condition strings (its ``mps.py``): they are
the overall checkpoint with a narrower condition mask, not separate official models (the per-dimension
MPS models were never released). DiffSynth's own "overall" string drops the final full stop; the
official one is used here.

Weights, in any of:

1. the official ``MPS_overall_checkpoint.pth``, a pickled whole module: read through
   `diffalign.scorers.restricted_pickle` with `PICKLED_CLASSES` as inert stand-ins, nothing of the
   pickle run; the CLIP config and the cross model's sizes come from the pickle itself;
2. a plain state dict (``.pt``/``.pth`` loadable with ``weights_only``, or ``.safetensors``) with keys
   ``model.*`` (transformers CLIP) + ``cross_model.*``; DiffSynth-Studio's
   ``MPS_overall_checkpoint_diffsynth.safetensors`` has this layout;
3. imscore's layout (``mps.model.*``, ``mps.cross_model.*``); a DDP ``module.`` prefix is also removed.

For 2–3 the CLIP architecture is ``clip_config`` (a transformers CLIP folder, its ``config.json`` or a
dict; default `LAION_CLIP_VIT_H_14`) and the cross model's sizes `CROSS_MODEL` (``dim`` = the CLIP
``projection_dim``) updated by ``cross_config``. Every key and shape is checked (`load_exact`).

The tokenizer is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s in the official code: pass ``tokenizer=DIR``
(or a ``clip_config`` folder holding tokenizer files). Prompts and conditions are padded to 77 tokens
("max_length") and truncated. Images: CLIPImageProcessor (shortest edge 224 bicubic, centre crop at
``(H − 224) // 2``, OpenAI mean/std). The official code runs in float16 on CUDA (``image.half()``);
here the scorer's ``dtype`` (float32 by default).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffalign.scorers.base import ModelScorer, Preference, ScorerConfigError
from diffalign.scorers.hf_clip import OPTIONAL_KEYS, load_clip_tokenizer
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor
from diffalign.scorers.restricted_pickle import PickledObject, load_restricted, module_state_dict
from diffalign.scorers.weights import ScorerWeightsError, load_exact, read_state_dict, strip_prefix

OVERALL_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
                     "structure, instance, texture, quantity, attributes, position, number, location, word, things.")
CONDITIONS = {
    "overall": OVERALL_CONDITION,  # README / eval_overall_mps_on_*.py
    "aesthetics": "light, color, clarity, tone, style, ambiance, artistry",  # DiffSynth-Studio mps.py
    "quality": "shape, face, hair, hands, limbs, structure, instance, texture",
    "semantic": "quantity, attributes, position, number, location",
}
CONTEXT_LENGTH = 77
MASK_THRESHOLD_EVAL = 0.3  # eval_overall_mps_on_hpdv2.py, DiffSynth-Studio
MASK_THRESHOLD_TRAIN = 0.01  # trainer/models/clip_model.py: CLIPModel.forward

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json (the architecture keys); eos_token_id 2 = legacy pooling
LAION_CLIP_VIT_H_14 = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                      "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
}
# Cross_model(dim=1024, layer_num=4, heads=16) with its defaults dim_head=64, ff_mult=4; dim = projection_dim
CROSS_MODEL = {"layer_num": 4, "heads": 16, "dim_head": 64, "ff_mult": 4}

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps")

_MODELING = "transformers.models.clip.modeling_clip."
# Everything a pickled MPS module names besides tensors and plain containers, under transformers 4.27
# (the release's pin; CLIPTextTransformer/CLIPVisionTransformer) and later (CLIPTextModel/CLIPVisionModel,
# SDPA/flash attention classes). All are read as inert records, never imported.
PICKLED_CLASSES = (
    "trainer.models.clip_model.CLIPModel", "trainer.models.clip_model.XCLIPModel",
    *("trainer.models.cross_modeling." + n for n in (
        "Cross_model", "Residual", "CrossAttention", "ParallelTransformerBlock", "LayerNorm", "RotaryEmbedding", "SwiGLU")),
    *(_MODELING + n for n in (
        "CLIPModel", "CLIPTextTransformer", "CLIPVisionTransformer", "CLIPTextModel", "CLIPVisionModel",
        "CLIPTextEmbeddings", "CLIPVisionEmbeddings", "CLIPEncoder", "CLIPEncoderLayer", "CLIPAttention",
        "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")),
    *("transformers.models.clip.configuration_clip." + n for n in ("CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig")),
    "transformers.generation.configuration_utils.GenerationConfig",
    *("transformers.activations." + n
      for n in ("GELUActivation", "QuickGELUActivation", "NewGELUActivation", "FastGELUActivation")),
    "torch._C._nn.gelu", "torch.nn.functional.gelu",  # GELUActivation.act
    "torch.nn.modules.linear.Linear", "torch.nn.modules.linear.Identity", "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    # transformers >= 5.25 keeps a `kernels` Mode flag (an enum value: INFERENCE, TRAINING, ...) on every
    # PreTrainedModel (`PreTrainedModel.kernels_mode`), so a module pickled there names it too.
    "kernels._internals.layer.mode.Mode",
)
LAYOUT_PREFIXES = ("mps.", "module.")  # imscore's mixin, DDP


# ---------------------------------------------------------------------------------------------- cross model


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learnt weight and a zero bias *buffer* (``norm.bias`` is in the state dict)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    """x + fn(x, ...)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.fn(x, *args) + x


class SwiGLU(nn.Module):
    """SwiGLU(x ‖ g) = silu(g) · x, the last dimension halved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class RotaryEmbedding(nn.Module):
    """Rotary angles θ_{p,k} = p · inv_freq_k for positions p < n, repeated for both halves: (n, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int) -> torch.Tensor:
        positions = torch.arange(n, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(positions, self.inv_freq)
        return torch.cat((angles, angles), dim=-1)


def rotate(angles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x·cos θ + rotate_half(x)·sin θ, with rotate_half(x₁ ‖ x₂) = (−x₂ ‖ x₁)."""
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def multi_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ + bias)·v for q (B, H, N, d) and one key/value head k, v (B, M, d) shared by all H."""
    logits = q @ k.unsqueeze(1).transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    weights = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    return weights @ v.unsqueeze(1)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Image tokens attend to prompt tokens (masked), plus a parallel SwiGLU feed-forward."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.norm = BiasFreeLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.to_out(merge_heads(multi_query_attention(q, k, v, mask))) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """Rotary multi-query self-attention and a SwiGLU feed-forward from one fused projection, summed."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.fused_dims = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = BiasFreeLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        angles = self.rotary_emb(n)
        q, k = rotate(angles, q) * self.scale, rotate(angles, k)
        return self.attn_out(merge_heads(multi_query_attention(q, k, v))) + self.ff_out(ff)


class CrossModel(nn.Module):
    """``Cross_model``: ``layer_num`` × [Residual(CrossAttention), Residual(ParallelTransformerBlock)]."""

    def __init__(self, dim: int, layer_num: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                           Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num))

    def forward(self, image_tokens: torch.Tensor, prompt_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = image_tokens
        for cross_attention, block in self.layers:
            x = block(cross_attention(x, prompt_tokens, mask))
        return x


class MPSNetwork(nn.Module):
    """The official ``CLIPModel`` wrapper's state-dict layout: ``model`` (transformers CLIP) + ``cross_model``."""

    def __init__(self, clip_config, cross: Mapping[str, int]):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.model.text_model.eos_token_id = 2  # legacy argmax pooling, as the released checkpoint (MPS#2)
        self.cross_model = CrossModel(dim=clip_config.projection_dim, **cross)

    def text_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) projected prompt tokens and (B, D) projected EOS token; no padding mask, as officially."""
        out = self.model.text_model(input_ids=input_ids)
        return self.model.text_projection(out.last_hidden_state), self.model.text_projection(out.pooler_output)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, D) projected vision tokens, without ``post_layernorm``."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).last_hidden_state)


def condition_mask(prompt_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) additive mask over prompt tokens: 0 where a token's best similarity to the condition's tokens,
    over the prompt's best, exceeds ``threshold``; −∞ elsewhere (module docstring)."""
    similarity = torch.einsum("bid,jd->bij", prompt_tokens, condition_tokens).amax(dim=-1)
    similarity = similarity / similarity.amax(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=prompt_tokens.dtype, device=prompt_tokens.device)
    return torch.where(similarity > threshold, zero, torch.full_like(zero, float("-inf")))


# ---------------------------------------------------------------------------------------------- loading


def _clip_config(source):
    """A ``CLIPConfig`` from a dict, a config.json or a folder holding one (None: `LAION_CLIP_VIT_H_14`)."""
    from transformers import CLIPConfig

    if source is None:
        source = LAION_CLIP_VIT_H_14
    if not isinstance(source, Mapping):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ScorerWeightsError(f"{path}: CLIP config not found")
        source = json.loads(path.read_text())
    return CLIPConfig.from_dict(dict(source))


def _pick(record, keys) -> dict:
    fields = vars(record) if isinstance(record, PickledObject) else dict(record)
    return {k: fields[k] for k in keys if k in fields}


def _clip_config_from_pickle(config: PickledObject):
    """The architecture of the CLIP config stored in the pickled module."""
    from transformers import CLIPConfig

    fields = vars(config)
    if "text_config" not in fields or "vision_config" not in fields:
        raise ScorerWeightsError(f"the pickled CLIP config ({config.official_name}) has no text_config/vision_config")
    return CLIPConfig(text_config=_pick(fields["text_config"], _TEXT_KEYS),
                      vision_config=_pick(fields["vision_config"], _VISION_KEYS),
                      **_pick(fields, ("projection_dim", "logit_scale_init_value")))


def _cross_sizes(sd: Mapping[str, torch.Tensor], heads: int) -> dict[str, int]:
    """Cross-model sizes from the first layer's weight shapes and the pickled ``heads``."""
    first = "cross_model.layers.0.0.fn."
    try:
        dim = sd[first + "to_q.weight"].shape[1]
        dim_head = sd[first + "to_kv.weight"].shape[0] // 2
        ff_mult = sd[first + "ff.2.weight"].shape[1] // dim
    except KeyError as e:
        raise ScorerWeightsError(f"the pickled cross model has no {e.args[0]}") from e
    layers = {k.split(".")[2] for k in sd if k.startswith("cross_model.layers.")}
    return {"layer_num": len(layers), "heads": int(heads), "dim_head": int(dim_head), "ff_mult": int(ff_mult)}


def _from_pickled_module(root: PickledObject, where: str):
    """(state dict, CLIP config, cross sizes) of the official pickled ``trainer.models.clip_model.CLIPModel``."""
    modules = vars(root).get("_modules", {})
    if root.official_name != "trainer.models.clip_model.CLIPModel" or not {"model", "cross_model"} <= set(modules):
        raise ScorerWeightsError(f"{where}: a pickled {root.official_name}, not MPS's "
                                 "trainer.models.clip_model.CLIPModel with model and cross_model")
    sd = module_state_dict(root)
    config = vars(modules["model"]).get("config")
    if not isinstance(config, PickledObject):
        raise ScorerWeightsError(f"{where}: the pickled XCLIPModel has no config")
    cross_attention = modules["cross_model"]
    for name in ("layers", "0", "0", "fn"):
        cross_attention = vars(cross_attention).get("_modules", {}).get(name)
        if not isinstance(cross_attention, PickledObject):
            raise ScorerWeightsError(f"{where}: the pickled cross model has no layers.0.0.fn")
    if not isinstance(vars(cross_attention).get("heads"), int):
        raise ScorerWeightsError(f"{where}: the pickled CrossAttention has no heads")
    return sd, _clip_config_from_pickle(config), _cross_sizes(sd, cross_attention.heads)


def _strip_layout_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in LAYOUT_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd, stripped = strip_prefix(sd, prefix), True
    return sd


def read_checkpoint(path: str | Path):
    """(state dict, pickled CLIP config or None, pickled cross sizes or None) from any supported file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _strip_layout_prefixes(read_state_dict(path)), None, None
    obj = load_restricted(path, PICKLED_CLASSES)
    if isinstance(obj, PickledObject):
        return _from_pickled_module(obj, str(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ScorerWeightsError(f"{path}: expected a pickled MPS module or a state dict of tensors, "
                                 f"found {type(obj).__name__}")
    return _strip_layout_prefixes(obj), None, None


# ---------------------------------------------------------------------------------------------- scorer


class MPS(ModelScorer):
    """MPS scores (module docstring) for ``overall`` and each condition dimension.

    ``mask_threshold`` τ: 0.3 as the official eval scripts and DiffSynth (default), 0.01 as
    ``CLIPModel.forward`` (training). ``conditions`` adds or replaces {dimension: condition string}
    (None: `CONDITIONS`; ``overall`` is the official string unless replaced). ``clip_config`` and
    ``cross_config`` give the architecture of plain state dicts; a pickled module carries its own, and
    there ``clip_config`` only serves as a tokenizer folder.
    """

    name = "mps"
    dimensions = tuple(CONDITIONS)

    def __init__(self, path: str | Path, clip_config=None, tokenizer: str | Path | None = None,
                 mask_threshold: float = MASK_THRESHOLD_EVAL, conditions: Mapping[str, str] | None = None,
                 cross_config: Mapping[str, int] | None = None, **options):
        super().__init__(**options)
        if not 0.0 <= mask_threshold < 1.0:  # the prompt's best token scores 1; τ ≥ 1 would mask every token
            raise ScorerConfigError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
        tokenizer_dir = tokenizer if tokenizer is not None else clip_config
        if tokenizer_dir is None or isinstance(tokenizer_dir, Mapping) or not Path(tokenizer_dir).is_dir():
            raise ScorerWeightsError(f"{path}: MPS needs the CLIP-H tokenizer; pass tokenizer=DIR (a folder with "
                                     "the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
        self.tokenizer = load_clip_tokenizer(tokenizer_dir)
        sd, pickled_config, pickled_cross = read_checkpoint(path)
        if pickled_config is not None:
            config, cross = pickled_config, pickled_cross
        else:
            config = _clip_config(clip_config)
            cross = {**CROSS_MODEL, **(cross_config or {})}
        network = MPSNetwork(config, cross)
        load_exact(network, sd, str(path), ignore=tuple("model." + k for k in OPTIONAL_KEYS))
        self.network = network.to(self.device, self.dtype).eval().requires_grad_(False)
        self.conditions = dict(CONDITIONS) if conditions is None else {"overall": OVERALL_CONDITION, **conditions}
        self.dimensions = tuple(self.conditions)
        self.mask_threshold = float(mask_threshold)
        self.image_size = config.vision_config.image_size

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop="hf")

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop="hf")

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        net = self.network
        prompt_tokens, prompt_eos = net.text_tokens(self.tokenize(prompts))
        condition_tokens, _ = net.text_tokens(self.tokenize(list(self.conditions.values())))
        image_tokens = net.image_tokens(pixels)
        text = prompt_eos / prompt_eos.norm(dim=-1, keepdim=True)
        scale = net.model.logit_scale.exp()
        scores = {}
        for dimension, condition in zip(self.conditions, condition_tokens):
            mask = condition_mask(prompt_tokens, condition, self.mask_threshold)[:, None, None, :]
            image = net.cross_model(image_tokens, prompt_tokens, mask)[:, 0]
            scores[dimension] = scale * (text * image / image.norm(dim=-1, keepdim=True)).sum(-1)
        return scores

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        """softmax([s_a, s_b])_0 = σ(s_a − s_b), the README's ``infer_example``."""
        return Preference(torch.sigmoid(score_a - score_b), calibrated=True)
