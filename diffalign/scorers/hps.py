"""HPSv2 and HPSv2.1 (Wu et al. 2023; tgxs002/HPSv2): an open_clip ViT-H-14 fine-tuned on HPDv2.

    s(x, c) = cos(E_img(x), E_txt(c))                      (``hpsv2/img_score.py``; no logit scale)
    P(a ≻ b) = softmax(τ·[s_a, s_b])_0 = σ(τ·(s_a − s_b))  (its cross-entropy ``PreferenceLoss``), τ = exp(logit_scale)

The HPSv2 benchmark reports 100·s. v2.0 and v2.1 scores are not comparable (the README says so): they are
two registry names. Weights: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (``{'state_dict': ...}``,
fp16, loaded with ``weights_only=True``) or DiffSynth's flat ``.safetensors`` conversion. The model is built
with ``pretrained=None`` (no download of the laion weights it overwrites) from open_clip's ``ViT-H-14``
config, or from ``architecture`` (a config name or an ``{embed_dim, vision_cfg, text_cfg}`` dict). Images
are letterboxed (`preprocess.letterbox`), not centre-cropped, and resized without antialiasing as a release-era
install does; ``antialias=True`` matches a fresh official install (docs/scorers.md). Prompts use open_clip's
tokenizer (77 tokens, truncated with the end token kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffalign.scorers.base import ModelScorer, Preference, ScorerConfigError
from diffalign.scorers.hf_clip import unique_prompts
from diffalign.scorers.preprocess import letterbox, letterbox_tensor
from diffalign.scorers.weights import load_exact, read_state_dict, strip_prefix

VERSIONS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}


def open_clip_config(architecture: str | dict | Path) -> dict:
    import open_clip

    if isinstance(architecture, dict):
        return architecture
    if Path(str(architecture)).suffix == ".json":
        return json.loads(Path(architecture).read_text())
    config = open_clip.get_model_config(str(architecture))
    if config is None:
        raise ScorerConfigError(f"unknown open_clip architecture {architecture!r}")
    return config


class HPSv2(ModelScorer):
    name = "hpsv21"

    def __init__(self, path: str | Path, version: str = "hpsv21", architecture: str | dict | Path = "ViT-H-14",
                 antialias: bool = False, **options):
        import open_clip

        super().__init__(**options)
        if version not in VERSIONS:
            raise ScorerConfigError(f"HPS version must be one of {sorted(VERSIONS)}, got {version!r}")
        self.name, self.antialias = version, antialias
        config = open_clip_config(architecture)
        self.model = open_clip.CLIP(**config)
        sd = read_state_dict(path, lazy=True)
        if all(k.startswith("module.") for k in sd):
            sd = strip_prefix(sd, "module.")
        load_exact(self.model, sd, str(path))
        self.model = self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        self.image_size = config["vision_cfg"].get("image_size", 224)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return letterbox(images, self.image_size, antialias=self.antialias)

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return letterbox_tensor(pixels, self.image_size, antialias=self.antialias)

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        unique, index = unique_prompts(prompts)  # each prompt's text features once per batch
        image = self.model.encode_image(pixels, normalize=True)
        text = self.model.encode_text(self.tokenizer(unique).to(self.device), normalize=True)
        return {"overall": (image * text[index.to(self.device)]).sum(-1)}

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        scale = self.model.logit_scale.exp().float().to(score_a.device)
        return Preference(torch.sigmoid(scale * (score_a - score_b)), calibrated=True)
