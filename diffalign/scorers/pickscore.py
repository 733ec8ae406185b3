"""PickScore v1 (Kirstain et al. 2023; yuvalkirstain/PickScore): a CLIP-H fine-tuned on Pick-a-Pic.

    s(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c))                   (README ``calc_probs``)
    P(a ≻ b) = softmax([s_a, s_b])_0 = σ(s_a − s_b)                        (its training loss)

Weights: a transformers CLIP folder (``yuvalkirstain/PickScore_v1``). The official code takes its
processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: CLIP centre-crop preprocessing (224, crop at
``(H − 224) // 2``) and the CLIP tokenizer padded to the longest prompt, truncated at 77 tokens. Pass
``tokenizer=DIR`` when the model folder has no tokenizer files.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.scorers.base import Preference
from diffalign.scorers.hf_clip import CLIPFolderScorer, clip_cosine


class PickScore(CLIPFolderScorer):
    name = "pickscore"
    crop = "hf"

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        cos = clip_cosine(self.model, self.tokenizer, pixels, prompts, padding="longest")
        return {"overall": self.model.logit_scale.exp() * cos}

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        return Preference(torch.sigmoid(score_a - score_b), calibrated=True)
