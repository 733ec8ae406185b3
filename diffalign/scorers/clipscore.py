"""CLIPScore: image–text cosine similarity of a CLIP model, under a stated convention.

    hessel (default):  s = 2.5 · max(cos(E_img(x), E_txt("A photo depicts " + c)), 0)
                       (Hessel et al. 2021, jmhessel/clipscore ``clipscore.py``, ViT-B/32)
    torchmetrics:      s = max(100 · cos(E_img(x), E_txt(c)), 0)   (``CLIPScore``, ViT-L/14 by default)
    raw:               s = cos(E_img(x), E_txt(c))                 (ImageReward's CLIP baseline)

Weights: a transformers CLIP folder (``openai/clip-vit-base-patch32`` and the like). Images take the
OpenAI CLIP transform (torchvision centre crop); prompts are truncated at 77 tokens. No calibration:
`prefer` is Bradley–Terry on the score difference, marked uncalibrated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffalign.scorers.base import ModelScorer
from diffalign.scorers.hf_clip import clip_cosine, load_clip_model, load_clip_tokenizer
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor

CONVENTIONS = {
    "hessel": ("A photo depicts ", lambda cos: 2.5 * cos.clamp(min=0)),
    "torchmetrics": ("", lambda cos: (100 * cos).clamp(min=0)),
    "raw": ("", lambda cos: cos),
}


class CLIPScore(ModelScorer):
    name = "clipscore"

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, convention: str = "hessel", **options):
        super().__init__(**options)
        if convention not in CONVENTIONS:
            raise ValueError(f"clipscore convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        self.convention = convention
        self.model = load_clip_model(path, dtype=self.dtype).to(self.device)
        self.tokenizer = load_clip_tokenizer(path, tokenizer)
        self.image_size = self.model.config.vision_config.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop="torchvision")

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop="torchvision")

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prefix, transform = CONVENTIONS[self.convention]
        cos = clip_cosine(self.model, self.tokenizer, pixels, [prefix + p for p in prompts], padding="longest")
        return {"overall": transform(cos)}
