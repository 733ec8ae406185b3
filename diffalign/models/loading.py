"""Load SD1.5- and SDXL-family components from a local diffusers directory, a hub id, a single-file
``.safetensors`` checkpoint (`diffalign.models.single_file`), or a builtin tiny model.

The family is read from the UNet config: ``addition_embed_type == "text_time"`` means SDXL (two text
encoders, pooled embeddings and time ids), anything else is SD1.5-style (one encoder). Hub ids load from
the local cache only when ``HF_HUB_OFFLINE`` is set (huggingface_hub honours it); a missing path or an
unreachable id is a clear `ModelLoadError` naming the config key (``model.pretrained`` or ``model.vae``). A
builtin model uses its own VAE: a separate ``model.vae`` is refused, as is an unknown ``builtin:`` name.
The libraries' loading chatter is silenced while loading (`diffalign.models.quiet`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.config import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, ModelConfig
from diffalign.config.base import BUILTIN_MODELS, BUILTIN_PREFIX, check_builtin, check_separate_vae
from diffalign.models.errors import ModelLoadError  # re-exported: diffalign.models.loading.ModelLoadError
from diffalign.models.quiet import quiet_loading
from diffalign.models.single_file import is_single_file, load_single_file_pipeline

BUILTINS = BUILTIN_MODELS
PRETRAINED, VAE = "model.pretrained", "model.vae"  # the config keys a load error names

Family = Literal["sd15", "sdxl"]


@dataclass
class Components:
    """Everything training and caching need from a text-to-image pipeline."""

    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    scheduler: DDPMScheduler
    prediction_type: str
    source: str
    extra: dict = field(default_factory=dict)
    # SDXL: the unconditional branch of classifier-free guidance uses zero embeddings for an empty negative
    # prompt (diffusers' `force_zeros_for_empty_prompt`, from the pipeline's model_index.json; SDXL base:
    # true) instead of the encoded "" caption. Must match how the model saw dropped captions in training.
    zero_empty_prompt: bool = True

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def detect_family(unet_config: dict) -> Family:
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _from_pretrained(cls, ref: str, subfolder: str | None, cfg: ModelConfig, key: str = PRETRAINED, **kw):
    """`cls.from_pretrained` without the libraries' loading chatter; a failure is a `ModelLoadError` naming `key`.
    Networks load from safetensors only (``use_safetensors=True``): a folder holding only pickled ``.bin`` weights is
    refused rather than unpickled, whatever the libraries' defaults or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say."""
    local = Path(ref).is_dir()
    revision = cfg.revision if key == PRETRAINED and not local else None  # model.revision is that of model.pretrained
    where = f"{ref}/{subfolder}" if subfolder else ref
    if issubclass(cls, torch.nn.Module):
        kw["use_safetensors"] = True
    try:
        with quiet_loading():
            return cls.from_pretrained(
                ref,
                subfolder=subfolder,
                revision=revision,
                variant=cfg.variant,
                local_files_only=local or _offline(),
                **kw,
            )
    except (OSError, ValueError, EnvironmentError) as e:
        pickled = sorted(p.name for p in Path(where).glob("*.bin")) if local else []
        if pickled:
            raise ModelLoadError(f"{key}: '{where}' holds pickled weights only ({', '.join(pickled)}); diffalign loads .safetensors "
                                 "(convert once where you trust the file: diffusers' / transformers' save_pretrained writes them)") from None
        raise ModelLoadError(f"{key}: could not load {cls.__name__} from '{where}': {e}") from None


def _looks_local(ref: str) -> bool:
    """A filesystem path rather than a hub id ('org/name')."""
    return Path(ref).is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def _check_vae_path(cfg: ModelConfig) -> None:
    """A separate VAE given as a path must exist (checked before anything large loads)."""
    if cfg.vae and not Path(cfg.vae).is_dir() and _looks_local(cfg.vae):
        raise ModelLoadError(f"{VAE}: local directory '{cfg.vae}' does not exist")


def _load_vae(ref: str, cfg: ModelConfig) -> AutoencoderKL:
    """The pipeline's own VAE, or the separate `model.vae` (a diffusers AutoencoderKL directory or hub id)."""
    if not cfg.vae:
        return _from_pretrained(AutoencoderKL, ref, "vae", cfg)
    return _from_pretrained(AutoencoderKL, cfg.vae, None, cfg, key=VAE)


def _unet_config(ref: str, cfg: ModelConfig) -> dict:
    path = Path(ref)
    if path.is_dir():
        cfg_file = path / "unet" / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"model.pretrained: '{ref}' is a directory but has no unet/config.json (not a diffusers pipeline)")
        return json.loads(cfg_file.read_text())
    if _looks_local(ref):
        raise ModelLoadError(f"{PRETRAINED}: local directory '{ref}' does not exist")
    return dict(_from_pretrained(UNet2DConditionModel, ref, "unet", cfg).config)


def _builtin_pipeline(ref: str, prediction_type: str):
    from diffalign.models.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    if ref == BUILTIN_TINY_SDXL:
        return tiny_sdxl_pipeline(prediction_type=prediction_type)
    if ref == BUILTIN_TINY_SD15:
        return tiny_sd15_pipeline(prediction_type=prediction_type)
    from diffalign.toy.model import load_toy_pipeline

    return load_toy_pipeline()


def _check_builtin(cfg: ModelConfig) -> None:
    """`ModelConfig`'s checks of a builtin name and a separate VAE, again for a config built without validation."""
    try:
        check_builtin(cfg.pretrained)
    except ValueError as e:
        raise ModelLoadError(f"{PRETRAINED}: {e} (got {cfg.pretrained!r})") from None
    try:
        check_separate_vae(cfg.pretrained, cfg.vae)
    except ValueError as e:
        raise ModelLoadError(f"{VAE}: {e} (got {cfg.vae!r})") from None


def _builtin(cfg: ModelConfig) -> Components:
    _check_builtin(cfg)
    pred = "epsilon" if cfg.prediction_type == "auto" else cfg.prediction_type
    with quiet_loading():
        p = _builtin_pipeline(cfg.pretrained, pred)
    family = detect_family(dict(p.unet.config))
    if family == "sdxl":
        encoders, tokenizers = [p.text_encoder, p.text_encoder_2], [p.tokenizer, p.tokenizer_2]
    else:
        encoders, tokenizers = [p.text_encoder], [p.tokenizer]
    p.scheduler.register_to_config(prediction_type=pred)
    zeros = bool(p.config.get("force_zeros_for_empty_prompt", True))
    return Components(family, p.unet, p.vae, encoders, tokenizers, p.scheduler, pred, cfg.pretrained, zero_empty_prompt=zeros)


def _zero_empty_prompt(ref: str) -> bool:
    """`force_zeros_for_empty_prompt` from a local pipeline's model_index.json (diffusers' default: true)."""
    index = Path(ref) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    return True


def _single_file(cfg: ModelConfig) -> tuple:
    """The parts of a single-file checkpoint; its configs from `model.single_file_config`, its VAE replaceable by `model.vae`."""
    family, pipe = load_single_file_pipeline(cfg.pretrained, cfg.single_file_config)
    vae = _load_vae(cfg.pretrained, cfg) if cfg.vae else pipe.vae
    if family == "sdxl":
        encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    else:
        encoders, tokenizers = [pipe.text_encoder], [pipe.tokenizer]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return family, pipe.unet, vae, encoders, tokenizers, scheduler, zeros


def _diffusers_pipeline(cfg: ModelConfig) -> tuple:
    """The parts of a diffusers pipeline directory or hub id, one subfolder each."""
    ref = cfg.pretrained
    family = detect_family(_unet_config(ref, cfg))
    unet = _from_pretrained(UNet2DConditionModel, ref, "unet", cfg)
    vae = _load_vae(ref, cfg)
    scheduler = _from_pretrained(DDPMScheduler, ref, "scheduler", cfg)
    encoders = [_from_pretrained(CLIPTextModel, ref, "text_encoder", cfg)]
    tokenizers = [_from_pretrained(CLIPTokenizer, ref, "tokenizer", cfg)]
    if family == "sdxl":
        encoders.append(_from_pretrained(CLIPTextModelWithProjection, ref, "text_encoder_2", cfg))
        tokenizers.append(_from_pretrained(CLIPTokenizer, ref, "tokenizer_2", cfg))
    return family, unet, vae, encoders, tokenizers, scheduler, _zero_empty_prompt(ref)


def load_components(cfg: ModelConfig) -> Components:
    """Load UNet, VAE, text encoders, tokenizers and the training noise scheduler for `cfg.pretrained`."""
    ref = cfg.pretrained
    if ref.startswith(BUILTIN_PREFIX):
        return _builtin(cfg)
    _check_vae_path(cfg)
    load = _single_file if is_single_file(ref) else _diffusers_pipeline
    family, unet, vae, encoders, tokenizers, scheduler, zeros = load(cfg)
    pred = scheduler.config.get("prediction_type", "epsilon") if cfg.prediction_type == "auto" else cfg.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"model.prediction_type: '{pred}' from the scheduler config is not supported (epsilon, v_prediction)")
    scheduler.register_to_config(prediction_type=pred)
    return Components(family, unet, vae, encoders, tokenizers, scheduler, pred, ref, zero_empty_prompt=zeros)


def vae_encode_dtype(cfg: ModelConfig, mixed_precision: str) -> torch.dtype:
    """fp32 unless a configured fp16-safe VAE is given (the SDXL VAE overflows in fp16)."""
    if cfg.vae and cfg.vae_fp16_safe and mixed_precision in ("fp16", "bf16"):
        return torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.float32


@torch.no_grad()
def encode_prompts(components: Components, captions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning as the pipelines compute it.

    SD1.5: last hidden state of the encoder -> (N, 77, D); pooled is None.
    SDXL: penultimate hidden states of both encoders concatenated -> (N, 77, D1 + D2); pooled = the
    second encoder's projected text embedding -> (N, D2).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        if components.family == "sd15":
            hidden.append(out.last_hidden_state)
        else:
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of images in [-1, 1] (N, 3, H, W) -> (mean, logvar), each (N, C, h, w), unscaled."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def sdxl_time_ids(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> list[int]:
    """SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
    return [original_hw[0], original_hw[1], crop_tl[0], crop_tl[1], target_hw[0], target_hw[1]]


def build_pipeline(components: Components, unet: UNet2DConditionModel | None = None, scheduler=None):
    """A diffusers text-to-image pipeline over the components (optionally another UNet / sampler)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = unet if unet is not None else components.unet
    scheduler = scheduler if scheduler is not None else DDIMScheduler.from_config(components.scheduler.config)
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,  # an invisible watermark would alter images that are scored and compared
            force_zeros_for_empty_prompt=components.zero_empty_prompt,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
