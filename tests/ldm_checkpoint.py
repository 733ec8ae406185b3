"""Write a diffusers SD1.5 / SDXL pipeline as a single-file checkpoint in the original Stable Diffusion key layout.

The layout community checkpoints ship in (CompVis ``ldm`` / Stability ``sgm`` module names), written here from the
module structure of those repositories: UNet under ``model.diffusion_model.`` (``input_blocks.i.{0 resnet, 1
attention}``, ``middle_block.{0,1,2}``, ``output_blocks.i.{0 resnet, 1 attention, last: upsampler}``; resnets as
``in_layers / emb_layers / out_layers / skip_connection``), the VAE under ``first_stage_model.`` (``down.i.block.j``,
``mid.block_1 / attn_1 / block_2``, ``up.i`` numbered from the lowest resolution, attention projections as 1×1
convolutions), the SD1.5 text encoder under ``cond_stage_model.transformer.text_model.``, SDXL's under
``conditioner.embedders.0.transformer.text_model.`` (CLIP-L) and ``conditioner.embedders.1.model.`` (OpenCLIP bigG:
``transformer.resblocks.i`` with a fused ``attn.in_proj_weight``, ``text_projection`` stored transposed).
Tests load the file back through diffusers' converter and compare every tensor: a wrong name fails there.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{RESNET[layer]}.{param}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1  # input / output blocks per resolution level (resnets + a resampler)
    up_has_attention = {b: "CrossAttn" in t for b, t in enumerate(unet.config.up_block_types)}
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        if module in UNET_TOP:
            new = f"{UNET_TOP[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"input_blocks.{1 + b * per + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"output_blocks.{b * per + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # a linear layer of diffusers is a 1×1 convolution there
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under `prefix` + ``text_model.`` (its names kept)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in encoder.state_dict().items()}


OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's names under `prefix`."""
    sd = encoder.state_dict()
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{block}attn.in_proj_{param}"] = torch.cat([sd[f"{layer}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP.items():
                out[f"{block}{theirs}.{param}"] = sd[f"{layer}{ours}.{param}"]
    return out


def write_single_file(pipe, path: Path) -> Path:
    """`pipe` (StableDiffusionPipeline or StableDiffusionXLPipeline) as one safetensors file at `path`."""
    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd |= clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        sd |= open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    else:
        sd |= clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer.")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
