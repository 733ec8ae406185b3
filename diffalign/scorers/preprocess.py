"""Each scorer family's official image preprocessing, as a PIL path and a differentiable tensor path.

PIL paths reproduce the official transforms pixel for pixel:

- `clip_center_crop`: resize the shortest edge to ``size`` (bicubic, long edge ``int(size * long / short)``),
  centre crop, scale to [0, 1], normalise with OpenAI CLIP's mean/std. ``crop="hf"`` is transformers'
  ``CLIPImageProcessor`` (PickScore, MPS): RGB first, the crop's top-left at ``(H - size) // 2``.
  ``crop="torchvision"`` is the ``Resize, CenterCrop, convert RGB, ToTensor, Normalize`` Compose of OpenAI
  CLIP, BLIP/ImageReward and the LAION aesthetic predictor: resized in the image's own mode, the crop at
  ``round((H - size) / 2)``, RGB last.
- `letterbox`: HPSv2's ``ResizeMaxSize`` (hpsv2/src/open_clip/transform.py): on the [0, 1] tensor, bicubic
  resize so the longest side is ``size``, zero-pad to ``size``×``size`` centred (left/top get ``pad // 2``),
  then normalise, so the padding becomes ``-mean/std``. HPSv2 does not resize an image whose longest side is
  already ``size``; it is still padded here so a batch stacks. torchvision's tensor resize antialiasing
  default changed in 0.17 (False before); the official package pins neither, so it is an argument, False
  by default (the torchvision of HPSv2's release).

Tensor paths take B×3×H×W in [0, 1] and use ``torch.nn.functional.interpolate`` (bicubic), so gradients flow.
The centre-crop ones antialias and are close to, not identical with, PIL's resize; the letterbox one is the
official transform itself (benchmarks/scorer_parity.py measures both).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after resizing the shortest edge to ``size``; the long edge is truncated, as torchvision and
    transformers both do."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _crop_offset(extent: int, size: int, crop: str) -> int:
    if crop == "hf":
        return (extent - size) // 2
    if crop == "torchvision":
        return int(round((extent - size) / 2.0))
    raise ValueError(f"crop must be 'hf' or 'torchvision', got {crop!r}")


def normalize(pixels: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """(x - mean) / std per channel of a ...×3×H×W tensor."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - m) / s


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """3×H×W float32 in [0, 1] from a PIL image (converted to RGB: RGBA and palette images included)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def clip_center_crop(images: Sequence[Image.Image], size: int = 224, crop: str = "hf",
                     mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """B×3×size×size: CLIP-family eval preprocessing on PIL images (module docstring)."""
    out = []
    for image in images:
        if crop == "hf":  # CLIPImageProcessor converts first; torchvision's Compose last (PIL resizes palette
            image = image.convert("RGB")  # images with nearest and RGBA premultiplied, so the order shows)
        h, w = shortest_edge_size(image.height, image.width, size)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.BICUBIC)
        top, left = _crop_offset(h, size, crop), _crop_offset(w, size, crop)
        image = image.crop((left, top, left + size, top + size))
        out.append(to_unit_tensor(image))
    return normalize(torch.stack(out), mean, std)


def letterbox(images: Sequence[Image.Image], size: int = 224, antialias: bool = False) -> torch.Tensor:
    """B×3×size×size: HPSv2's letterbox preprocessing on PIL images (module docstring)."""
    from torchvision.transforms.functional import InterpolationMode, resize

    out = []
    for image in images:
        x = to_unit_tensor(image)
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            x = resize(x, [round(h * scale), round(w * scale)], InterpolationMode.BICUBIC, antialias=antialias)
        out.append(_pad_centred(x, size))
    return normalize(torch.stack(out))


def _pad_centred(x: torch.Tensor, size: int) -> torch.Tensor:
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0.0)


def check_unit_tensor(pixels: torch.Tensor) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise ValueError(f"image tensor must be float B×3×H×W in [0, 1], got {pixels.dtype} {tuple(pixels.shape)}")


def clip_center_crop_tensor(pixels: torch.Tensor, size: int = 224, crop: str = "hf",
                            mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """Differentiable `clip_center_crop` on B×3×H×W in [0, 1]."""
    check_unit_tensor(pixels)
    h, w = shortest_edge_size(pixels.shape[-2], pixels.shape[-1], size)
    if (h, w) != tuple(pixels.shape[-2:]):
        pixels = F.interpolate(pixels, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = _crop_offset(h, size, crop), _crop_offset(w, size, crop)
    return normalize(pixels[..., top : top + size, left : left + size], mean, std)


def letterbox_tensor(pixels: torch.Tensor, size: int = 224, antialias: bool = False) -> torch.Tensor:
    """Differentiable `letterbox` on B×3×H×W in [0, 1]: the official transform is itself tensor ops, so this
    equals the PIL path up to the uint8 rounding of the input."""
    check_unit_tensor(pixels)
    h, w = pixels.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        pixels = F.interpolate(pixels, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False, antialias=antialias)
    return normalize(_pad_centred(pixels, size))
