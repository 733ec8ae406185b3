"""Tiny random-weight scorer checkpoints written in each official format, and awkward test inputs.

Every builder uses the library the official code uses (transformers CLIP for PickScore/CLIPScore/the
aesthetic features, open_clip for HPS) and writes the files as the official checkpoints are laid out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# prompts the tokenizers must survive: HTML entities, curly quotes, emoji, and more than 77 tokens
PROMPTS = [
    "a cat &amp; a dog on a sofa",
    "the \u201cbest\u201d bakery\u2019s bread",
    "a rocket \U0001F680 over the moon \U0001F315",
    "a very long prompt " + " ".join(f"with detail number {i}" for i in range(40)),
]


def images(sizes=((256, 320), (300, 224), (224, 224), (97, 150)), seed: int = 0) -> list[Image.Image]:
    """PIL images of the given (width, height): smooth gradients plus noise, one RGBA and one palette image."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        if i == 1:
            im = im.convert("RGBA")
        if i == 3:
            im = im.convert("P")
        out.append(im)
    return out


def tiny_clip_config(projection_dim: int = 16, image_size: int = 224, patch_size: int = 32):
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                vocab_size=49408, bos_token_id=49406, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_clip_folder(path: Path, seed: int = 0, tokenizer: bool = True, **config) -> Path:
    """A transformers CLIP folder (config.json, model.safetensors, tokenizer files) with random weights.
    ``eos_token_id=2`` as in the released CLIP-H configs (legacy argmax pooling)."""
    from transformers import CLIPModel

    from diffalign.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**config))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    model.save_pretrained(path)
    if tokenizer:
        build_clip_tokenizer().save_pretrained(path)
    return path


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_hps_checkpoint(path: Path, seed: int = 0, safetensors: bool = False) -> Path:
    """A tiny open_clip CLIP saved as HPSv2's ``HPS_v2*_compressed.pt`` (``{'state_dict': fp16}``), or as
    DiffSynth's flat safetensors conversion."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


def write_aesthetic_mlp(path: Path, input_dim: int = 16, seed: int = 0) -> Path:
    """The LAION aesthetic MLP's state dict as the official ``.pth`` lays it out (``layers.{0,2,4,6,7}``)."""
    torch.manual_seed(seed)
    dims = [input_dim, 1024, 128, 64, 16, 1]
    sd = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"layers.{index}.weight"] = torch.randn(o, i) / i**0.5
        sd[f"layers.{index}.bias"] = torch.randn(o) * 0.1
    torch.save(sd, path)
    return path
