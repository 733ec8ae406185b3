"""Tiny SD1.5-style and SDXL-style pipelines built from config (random weights, CPU-fast).

They have the real architectures' structure (CLIP text encoders with the real 49,408-token vocabulary,
a cross-attention UNet, a KL VAE; for SDXL two encoders, penultimate hidden states concatenated and
``text_time`` conditioning on pooled embeddings plus six time ids), at a size that trains on a laptop
CPU. Tests and the embedded default use them; real checkpoints go through exactly the same code.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.tokenizer import build_clip_tokenizer

TEXT_DIM = 32
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _text_config(projection_dim: int = TEXT_DIM, hidden_size: int = TEXT_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )


def tiny_vae() -> AutoencoderKL:
    """A 4-channel KL VAE with spatial factor 4 (32 px -> 8×8 latents)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
    )


def tiny_unet(sdxl: bool, sample_size: int = 8, prediction_type: str = "epsilon", text_dim_2: int = TEXT_DIM) -> UNet2DConditionModel:
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    if sdxl:
        return UNet2DConditionModel(
            **common,
            cross_attention_dim=TEXT_DIM + text_dim_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + text_dim_2,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(**common, cross_attention_dim=TEXT_DIM)


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", text_dim_2: int = TEXT_DIM) -> StableDiffusionXLPipeline:
    """Tiny SDXL: two CLIP text encoders (the second with projection), text_time UNet, KL VAE. `text_dim_2`: the second
    encoder's width (SDXL's are 768 and 1280; loaders that tell the encoders apart by width need them to differ)."""
    torch.manual_seed(seed)
    unet = tiny_unet(sdxl=True, text_dim_2=text_dim_2)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=text_dim_2, hidden_size=text_dim_2))
    scheduler = DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """Tiny SD1.5: one CLIP text encoder (last hidden state), cross-attention UNet, KL VAE."""
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=build_clip_tokenizer(),
        unet=tiny_unet(sdxl=False),
        scheduler=DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
