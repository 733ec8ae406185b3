"""The toy pipeline's architecture: a small SDXL (two CLIP text encoders with the real vocabulary, a UNet
with text_time conditioning, a KL VAE with spatial factor 4: 32 px images <-> 4×8×8 latents).

`toy_pipeline()` builds it with random weights (for `diffalign toy pretrain`); `load_toy_pipeline()`
loads the pretrained weights shipped in the package (`builtin:toy`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.errors import ModelLoadError
from diffalign.models.tiny import SD_SCHEDULER
from diffalign.models.tokenizer import build_clip_tokenizer

RESOLUTION = 32
TEXT_DIM = 64
TIME_EMBED_DIM = 16
WEIGHTS_DIR = Path(__file__).parent / "weights"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu",
    )


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64),
    )


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 1),
        use_linear_projection=True, cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,
    )


def _assemble(unet, vae, text_encoder, text_encoder_2) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet, scheduler=DDPMScheduler(**SD_SCHEDULER),
        force_zeros_for_empty_prompt=False,  # pretraining drops captions to the encoded "", so guidance must use it too
    )


def toy_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The toy architecture with random weights."""
    torch.manual_seed(seed)
    return _assemble(toy_unet(), toy_vae(), CLIPTextModel(_text_config()), CLIPTextModelWithProjection(_text_config()))


def load_toy_pipeline(weights: str | Path = WEIGHTS_DIR) -> StableDiffusionXLPipeline:
    """The pretrained toy pipeline (fp16 safetensors in the package, loaded as fp32)."""
    weights = Path(weights)
    if not (weights / "unet" / "config.json").is_file():
        raise ModelLoadError(f"model.pretrained: no toy weights at {weights}; run `diffalign toy pretrain --out {weights}`")
    kw = dict(variant="fp16", torch_dtype=torch.float32)
    return _assemble(
        UNet2DConditionModel.from_pretrained(weights / "unet", **kw),
        AutoencoderKL.from_pretrained(weights / "vae", **kw),
        CLIPTextModel.from_pretrained(weights / "text_encoder", **kw),
        CLIPTextModelWithProjection.from_pretrained(weights / "text_encoder_2", **kw),
    )


def save_toy_weights(pipe: StableDiffusionXLPipeline, out: str | Path) -> Path:
    """Write the four trained components as fp16 safetensors (diffusers/transformers layout, variant fp16)."""
    out = Path(out)
    for name in COMPONENTS:
        module = getattr(pipe, name)
        module.to(torch.float16).save_pretrained(out / name, variant="fp16", safe_serialization=True)
        module.to(torch.float32)
    return out
