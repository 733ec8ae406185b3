"""Loading a transformers CLIP folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
offline and strictly, with its tokenizer. Shared by PickScore, CLIPScore, the LAION aesthetic features and
MPS's backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffalign.scorers.base import ModelScorer
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor
from diffalign.scorers.weights import ScorerWeightsError, load_exact, read_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# buffers that older transformers saved and newer ones do not (or the reverse)
OPTIONAL_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def clip_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ScorerWeightsError(f"{path}: not a transformers CLIP folder (no config.json)")
    return path


def weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ScorerWeightsError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def load_clip_model(path: str | Path, vision_only: bool = False, dtype: torch.dtype = torch.float32):
    """A ``transformers.CLIPModel`` built from the folder's config, every key of the file checked; with
    ``vision_only`` a ``CLIPVisionModelWithProjection`` from the file's ``vision_model.*`` and
    ``visual_projection.*`` entries (a full CLIP folder or a vision-only one)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = clip_folder(path)
    raw = json.loads((folder / "config.json").read_text())
    file = weight_file(folder)
    sd = read_state_dict(file, lazy=True)  # safetensors: copied tensor by tensor, not held twice
    if vision_only:
        if "vision_config" in raw:  # a full CLIP folder: its vision tower, with the model's projection width
            full = CLIPConfig.from_dict(raw)
            vision = full.vision_config
            vision.projection_dim = full.projection_dim
        else:
            vision = CLIPVisionConfig.from_dict(raw)
        model = CLIPVisionModelWithProjection(vision)
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    else:
        model = CLIPModel(CLIPConfig.from_dict(raw))
    load_exact(model, sd, str(file), ignore=OPTIONAL_KEYS)
    return model.to(dtype).eval().requires_grad_(False)


def load_clip_tokenizer(path: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer saved in the model folder, or in ``tokenizer`` (PickScore's official code takes its
    processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    from transformers import AutoTokenizer

    folder = Path(tokenizer) if tokenizer is not None else Path(path)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ScorerWeightsError(f"{folder}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); "
                                 "pass tokenizer=DIR, a folder holding the CLIP tokenizer")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def projected(output) -> torch.Tensor:
    """The projected embedding from ``get_image_features``/``get_text_features`` (a tensor before
    transformers 5, an output whose ``pooler_output`` is projected from 5 on)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def unique_prompts(prompts) -> tuple[list[str], torch.Tensor]:
    """The distinct prompts in first-seen order, and each prompt's index among them. CLIP's text tower is
    causal, so a prompt's pooled feature does not depend on the other prompts padded beside it."""
    unique = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(unique)}
    return unique, torch.tensor([position[p] for p in prompts], dtype=torch.long)


def clip_cosine(model, tokenizer, pixels: torch.Tensor, prompts, padding="longest", max_length: int = 77) -> torch.Tensor:
    """(B,) cosine similarity of each image's and its prompt's projected CLIP embeddings (prompts
    truncated to ``max_length`` tokens, the end-of-text token kept)."""
    unique, index = unique_prompts(prompts)  # several images per prompt: each prompt is encoded once
    tokens = tokenizer(unique, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    device = pixels.device
    image = projected(model.get_image_features(pixel_values=pixels))
    text = projected(model.get_text_features(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text[index.to(device)]).sum(-1)


class CLIPFolderScorer(ModelScorer):
    """A scorer on a transformers CLIP folder: the model, its tokenizer, and centre-crop preprocessing in the
    variant ``crop`` names (`preprocess.clip_center_crop`). Subclasses give `score_pixels`."""

    crop = "hf"

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, **options):
        super().__init__(**options)
        self.model = load_clip_model(path, dtype=self.dtype).to(self.device)
        self.tokenizer = load_clip_tokenizer(path, tokenizer)
        self.image_size = self.model.config.vision_config.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop=self.crop)

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop=self.crop)
