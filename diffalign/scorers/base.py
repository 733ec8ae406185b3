"""The one scorer interface: ``score(images, prompts) -> {dimension: (B,) tensor}`` and ``prefer(a, b, prompts)``.

Images are a list of PIL images (each scorer applies its model's exact official preprocessing) or a float
tensor B×3×H×W in [0, 1] (the differentiable path). Every result includes ``overall``. `prefer` returns
P(a preferred over b) with the model's own calibration when its training loss defines one; otherwise a
Bradley–Terry probability on the score difference, marked ``calibrated=False``. ``order_symmetric`` says whether
``prefer(a, b)`` is always ``1 − prefer(b, a)``: true for every judge built on scores; a pairwise judge that sees two
images side by side (a VLM) may lean toward one position, and online rewards then ask it in both orders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image

from diffalign.rewards import bradley_terry  # re-exported: diffalign.scorers.bradley_terry

Images = Union[Sequence[Image.Image], torch.Tensor]


class ScorerConfigError(ValueError):
    """An unknown scorer, a bad scorer option, or weight files that were not given and are not in the weights folder."""


@dataclass(frozen=True)
class Preference:
    prob: torch.Tensor  # (B,) P(a preferred over b)
    calibrated: bool  # False: Bradley–Terry on score differences with an assumed temperature


@runtime_checkable
class Scorer(Protocol):
    name: str
    dimensions: tuple[str, ...]  # the keys `score` returns; always includes "overall"
    order_symmetric: bool  # prefer(a, b) == 1 − prefer(b, a) always (judges built on scores)

    def score_batch(self, pixels, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`score_pixels` on one batch of `preprocess` output, without gradients, as float32 on the CPU."""
        with torch.no_grad():
            out = self.score_pixels(pixels.to(self.device, self.dtype), list(prompts))
        return {k: v.float().cpu() for k, v in out.items()}

    def score(self, images: Images, prompts: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def prefer(self, a: Images, b: Images, prompts: Sequence[str]) -> Preference: ...


def as_uint8_arrays(images: Images) -> list[np.ndarray]:
    """H×W×3 uint8 arrays from PIL images (converted to RGB) or a B×3×H×W tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be B×3×H×W in [0, 1], got shape {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(arr)
    return [np.asarray(im.convert("RGB")) for im in images]


def check_batch(images: Images, prompts: Sequence[str]) -> int:
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if n != len(prompts):
        raise ValueError(f"{n} images but {len(prompts)} prompts")
    return n


class ModelScorer:
    """A reward model behind the `Scorer` interface: batching, device and dtype, the PIL and tensor paths.

    A subclass gives `preprocess` (PIL images -> model pixels, the official transform), `preprocess_tensor`
    (the differentiable version) and `score_pixels` (model pixels and prompts -> {dimension: (B,)}), and
    overrides `preference` where its training loss defines a calibration. PIL inputs are scored without
    gradients and returned as float32 on the CPU; tensor inputs keep their graph and device (float32 too).
    """

    name: str = "model"
    dimensions: tuple[str, ...] = ("overall",)
    order_symmetric: bool = True  # `prefer` compares two scores

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, batch_size: int = 16,
                 temperature: float = 1.0):
        if isinstance(dtype, str):  # "bfloat16" from a config or the command line
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ScorerConfigError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
            dtype = getattr(torch, dtype)
        self.device, self.dtype, self.batch_size, self.temperature = torch.device(device), dtype, batch_size, temperature

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score_batch(self, pixels, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`score_pixels` on one batch of `preprocess` output, without gradients, as float32 on the CPU."""
        with torch.no_grad():
            out = self.score_pixels(pixels.to(self.device, self.dtype), list(prompts))
        return {k: v.float().cpu() for k, v in out.items()}

    def score(self, images: Images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        n = check_batch(images, prompts)
        tensor_path = isinstance(images, torch.Tensor)
        chunks = []
        for i in range(0, n, self.batch_size):
            part, texts = images[i : i + self.batch_size], list(prompts[i : i + self.batch_size])
            if tensor_path:
                pixels = self.preprocess_tensor(part.to(self.device, torch.float32))
                chunks.append({k: v.float() for k, v in self.score_pixels(pixels.to(self.dtype), texts).items()})
            else:
                chunks.append(self.score_batch(self.preprocess(part), texts))
        if not chunks:
            return {k: torch.zeros(0) for k in self.dimensions}
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        """P(a > b) from two overall scores; Bradley–Terry at ``temperature`` unless the model defines one."""
        return Preference(bradley_terry(score_a, score_b, self.temperature), calibrated=False)

    def prefer(self, a: Images, b: Images, prompts: Sequence[str]) -> Preference:
        return self.preference(self.score(a, prompts)["overall"], self.score(b, prompts)["overall"])
