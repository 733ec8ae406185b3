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

from diffalign.scorers.base import ScorerConfigError
from diffalign.scorers.hf_clip import CLIPFolderScorer, clip_cosine

CONVENTIONS = {
    "hessel": ("A photo depicts ", lambda cos: 2.5 * cos.clamp(min=0)),
    "torchmetrics": ("", lambda cos: (100 * cos).clamp(min=0)),
    "raw": ("", lambda cos: cos),
}


class CLIPScore(CLIPFolderScorer):
    name = "clipscore"
    crop = "torchvision"

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, convention: str = "hessel", **options):
        if convention not in CONVENTIONS:
            raise ScorerConfigError(f"clipscore convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        super().__init__(path, tokenizer, **options)
        self.convention = convention

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prefix, transform = CONVENTIONS[self.convention]
        cos = clip_cosine(self.model, self.tokenizer, pixels, [prefix + p for p in prompts], padding="longest")
        return {"overall": transform(cos)}
