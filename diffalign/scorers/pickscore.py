"""PickScore v1 (Kirstain et al. 2023; yuvalkirstain/PickScore): a CLIP-H fine-tuned on Pick-a-Pic.

    s(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c))                   (README ``calc_probs``)
    P(a ≻ b) = softmax([s_a, s_b])_0 = σ(s_a − s_b)                        (its training loss)

Weights: a transformers CLIP folder (``yuvalkirstain/PickScore_v1``). The official code takes its
processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: CLIP centre-crop preprocessing (224, crop at
``(H − 224) // 2``) and the CLIP tokenizer padded to the longest prompt, truncated at 77 tokens. Pass
``tokenizer=DIR`` when the model folder has no tokenizer files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffalign.scorers.base import ModelScorer, Preference
from diffalign.scorers.hf_clip import clip_cosine, load_clip_model, load_clip_tokenizer
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor


class PickScore(ModelScorer):
    name = "pickscore"

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, **options):
        super().__init__(**options)
        self.model = load_clip_model(path, dtype=self.dtype).to(self.device)
        self.tokenizer = load_clip_tokenizer(path, tokenizer)
        self.image_size = self.model.config.vision_config.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop="hf")

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop="hf")

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        cos = clip_cosine(self.model, self.tokenizer, pixels, prompts, padding="longest")
        return {"overall": self.model.logit_scale.exp() * cos}

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        return Preference(torch.sigmoid(score_a - score_b), calibrated=True)
