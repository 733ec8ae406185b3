"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): a linear MLP
on the L2-normalised CLIP ViT-L/14 image embedding, trained by MSE on AVA-style ratings (≈1–10).

    s(x) = MLP(e / ‖e‖₂),  e = E_img(x)                                   (``simple_inference.py``)
    MLP = Linear(768,1024) → Dropout → Linear(1024,128) → Dropout → Linear(128,64) → Dropout
          → Linear(64,16) → Linear(16,1)          (no activations; keys ``layers.{0,2,4,6,7}``)

Weights: the MLP file (``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict, loaded weights-only, or a
safetensors conversion) and a transformers CLIP folder for the features (``openai/clip-vit-large-patch14``,
the ports' equivalent of the official ``clip.load("ViT-L/14")``; only its vision tower is loaded). Images
take the OpenAI CLIP transform. The prompt is ignored. No calibration: `prefer` is Bradley–Terry,
marked uncalibrated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from diffalign.scorers.base import ModelScorer
from diffalign.scorers.hf_clip import load_clip_model, projected
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor
from diffalign.scorers.weights import ScorerWeightsError, load_exact, read_state_dict


def aesthetic_mlp(input_dim: int = 768) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(input_dim, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticScorer(ModelScorer):
    name = "aesthetic"

    def __init__(self, path: str | Path, clip: str | Path, **options):
        super().__init__(**options)
        sd = read_state_dict(path)
        if "layers.0.weight" not in sd:
            raise ScorerWeightsError(f"{path}: not a LAION aesthetic MLP (no layers.0.weight)")
        self.mlp = aesthetic_mlp(sd["layers.0.weight"].shape[1])
        load_exact(self.mlp, {k.removeprefix("layers."): v for k, v in sd.items()}, str(path))
        self.clip = load_clip_model(clip, vision_only=True, dtype=self.dtype).to(self.device)
        if self.clip.config.projection_dim != self.mlp[0].in_features:
            raise ScorerWeightsError(f"{clip}: CLIP embeddings have {self.clip.config.projection_dim} dimensions, "
                                     f"the aesthetic MLP {path} takes {self.mlp[0].in_features}")
        self.mlp = self.mlp.to(self.device, torch.float32).eval().requires_grad_(False)
        self.image_size = self.clip.config.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop="torchvision")

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop="torchvision")

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.clip(pixel_values=pixels)
        embedding = (out.image_embeds if hasattr(out, "image_embeds") else projected(out)).float()
        return {"overall": self.mlp(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)}
