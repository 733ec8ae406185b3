"""The toy world's scenes: one coloured shape on a plain background, with a caption from a small grammar.

    caption := "a " [size " "] colour " " shape " on a " background " background"
    size    := small | large          (no word = medium)

Every scene is a pure function of (caption, seed): the caption fixes colour, shape, background and size
class; the seed draws the exact size within the class and the position (mostly near the centre, sometimes
off it, so a base model learns imperfect composition that a preference can fix). `HELD_OUT` is a fixed
split of captions never used for pretraining or preference data; evaluation uses only those.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffalign.randomness import hash_int

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "", "large")
# object extent (side of its bounding box) as a fraction of the image side, per size class
SIZE_RANGE = {"small": (0.28, 0.36), "": (0.42, 0.52), "large": (0.60, 0.70)}
OFF_CENTRE_PROBABILITY = 0.3  # the rest are within a few pixels of the centre


@dataclass(frozen=True)
class SceneSpec:
    colour: str
    shape: str
    background: str
    size: str = ""  # "small", "" (medium) or "large"

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class Scene:
    spec: SceneSpec
    extent: float  # bounding-box side / image side
    centre: tuple[float, float]  # (x, y) as fractions of the image side


def all_specs() -> list[SceneSpec]:
    return [SceneSpec(c, s, b, z) for c, s, b, z in itertools.product(COLOURS, SHAPES, BACKGROUNDS, SIZES)]


def _split() -> tuple[list[SceneSpec], list[SceneSpec]]:
    """A fixed split by caption hash, about 1 in 3 held out; every attribute value occurs on both sides."""
    train, held = [], []
    for spec in all_specs():
        h = hash_int(spec.caption, bits=32)
        (held if h % 3 == 0 else train).append(spec)
    return train, held


TRAIN, HELD_OUT = _split()


CAPTION = re.compile(r"^a (?:(small|large) )?(\w+) (\w+) on a (\w+) background$")


def parse_caption(caption: str) -> SceneSpec:
    """Inverse of `SceneSpec.caption`; raises ValueError on a caption outside the grammar."""
    m = CAPTION.match(caption.strip().lower())
    if not m or m[2] not in COLOURS or m[3] not in SHAPES or m[4] not in BACKGROUNDS:
        raise ValueError(f"caption outside the toy grammar: {caption!r}")
    return SceneSpec(m[2], m[3], m[4], m[1] or "")


def _rng(spec: SceneSpec, seed: int) -> random.Random:
    return random.Random(hash_int(f"{spec.caption}/{seed}"))


def sample_scene(spec: SceneSpec, seed: int) -> Scene:
    rng = _rng(spec, seed)
    lo, hi = SIZE_RANGE[spec.size]
    extent = rng.uniform(lo, hi)
    half = extent / 2
    if rng.random() < OFF_CENTRE_PROBABILITY:
        cx, cy = rng.uniform(half + 0.05, 1 - half - 0.05), rng.uniform(half + 0.05, 1 - half - 0.05)
    else:
        cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    return Scene(spec, extent, (cx, cy))


def shape_polygon(shape: str, centre: tuple[float, float], extent: float, size_px: int) -> list[tuple[float, float]] | tuple:
    """Pixel geometry of a shape: a bounding box for circles, a vertex list otherwise."""
    cx, cy = centre[0] * size_px, centre[1] * size_px
    h = extent * size_px / 2
    if shape == "circle":
        return (cx - h, cy - h, cx + h, cy + h)
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright, base at the bottom of the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size_px: int = 32, supersample: int = 4) -> Image.Image:
    """Draw the scene (anti-aliased by supersampling)."""
    big = size_px * supersample
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.spec.background])
    draw = ImageDraw.Draw(im)
    geometry = shape_polygon(scene.spec.shape, scene.centre, scene.extent, big)
    colour = COLOURS[scene.spec.colour]
    if scene.spec.shape == "circle":
        draw.ellipse(geometry, fill=colour)
    else:
        draw.polygon(geometry, fill=colour)
    return im.resize((size_px, size_px), Image.Resampling.BOX)


def render_caption(caption: str, seed: int, size_px: int = 32) -> Image.Image:
    return render(sample_scene(parse_caption(caption), seed), size_px)


def batch(specs: list[SceneSpec], seeds: list[int], size_px: int = 32) -> np.ndarray:
    """(N, size, size, 3) uint8 images of `specs[i]` drawn with `seeds[i]`."""
    return np.stack([np.asarray(render(sample_scene(s, seed), size_px)) for s, seed in zip(specs, seeds)])
