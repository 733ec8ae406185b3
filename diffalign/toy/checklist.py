"""The toy world's checklist: yes/no questions answered by measuring the image.

Measurement (`measure`): the background colour is the median of the border pixels; object pixels are
those far from it (RGB distance > `OBJECT_DISTANCE`); connected components are labelled (4-neighbour);
the largest is the object. Its colour is the median of its pixels named by the nearest palette entry;
its shape: a triangle when the triangle drawn in its bounding box fits better (IoU) than the circle and
the square, else a square when the corners of its bounding box are more than half filled, else a circle
(the IoU of circle and square templates cannot tell a rounded square from a boxy circle: both near 0.8);
its extent is the bounding-box side over the image side; its position is the bounding-box centre.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffalign.data.errors import DataError
from diffalign.scorers.base import Images, as_uint8_arrays, check_batch
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question
from diffalign.toy.scenes import BACKGROUNDS, COLOURS, SHAPES, parse_caption, shape_polygon

OBJECT_DISTANCE = 60.0  # RGB L2 distance from the background colour that makes a pixel "object"
MIN_COMPONENT_PX = 3  # smaller blobs are specks (noise), not objects
SIZE_BOUNDS = (0.39, 0.56)  # extent below -> small, above -> large, between -> medium (scene ranges: .28-.36, .42-.52, .60-.70)
CENTRE_TOLERANCE = 0.08  # bounding-box centre within ±8% of the image side of the middle
SHAPE_MIN_IOU = 0.6  # below this the blob is no recognisable shape
CORNER_PATCH = 0.25  # corner patches of the bounding box, as a fraction of its side
CORNER_SQUARE = 0.5  # mean coverage of the four corner patches above which a round-or-square blob is a square
BACKGROUND_NOISE = 12.0  # mean RGB distance of background pixels from the background colour
FILL_NOISE = 30.0  # mean RGB distance of object-interior pixels from the object colour
SPECK_FRACTION = 0.01  # stray non-background pixels outside the object, as a fraction of the image


@dataclass
class Measurement:
    background_rgb: np.ndarray
    background: str  # nearest background palette name
    found: bool  # an object was found
    colour: str | None = None
    colour_rgb: np.ndarray | None = None
    shape: str | None = None
    shape_iou: float = 0.0
    shape_ious: dict | None = None  # IoU of every shape template
    corner_fill: float = 0.0  # mean object coverage of the bounding box's four corner patches (square ~1, circle ~0.3)
    extent: float = 0.0
    centre: tuple[float, float] = (0.5, 0.5)
    components: int = 0
    touches_border: bool = False
    background_noise: float = 0.0
    fill_noise: float = 0.0
    speck_fraction: float = 0.0


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name], dtype=np.float64))))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return sorted(out, key=lambda c: -int(c.sum()))


def _template(shape: str, centre_px: tuple[float, float], extent_px: float, size: int, supersample: int = 4) -> np.ndarray:
    big = size * supersample
    im = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(im)
    geometry = shape_polygon(shape, (centre_px[0] / size, centre_px[1] / size), extent_px / size, big)
    (draw.ellipse if shape == "circle" else draw.polygon)(geometry, fill=1)
    coverage = np.asarray(im, dtype=np.float64).reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return coverage > 0.5  # as the measured mask: a pixel is inside when more than half covered


def _grow(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _shrink(mask: np.ndarray) -> np.ndarray:
    return ~_grow(~mask)


def measure(image: np.ndarray) -> Measurement:
    """Measure one H×W×3 uint8 image (square).

    Two passes: pixels far from the background find the object and its colour; then each pixel's
    coverage (its position between background and object colour) ≥ ½ gives the object's exact extent,
    so anti-aliased edges count as half a pixel, as they were drawn.
    """
    img = image.astype(np.float64)
    h, w, _ = img.shape
    if h != w:
        raise DataError(f"the toy checklist measures square images (the toy world's scenes), got {w}x{h}")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    m = Measurement(background_rgb=bg, background=_nearest(bg, BACKGROUNDS), found=False)
    coarse = [c for c in _components(dist > OBJECT_DISTANCE) if c.sum() >= MIN_COMPONENT_PX]
    m.components = len(coarse)
    if not coarse:
        m.background_noise = float(dist.mean())
        return m
    core = _shrink(coarse[0]) if _shrink(coarse[0]).any() else coarse[0]
    m.found = True
    m.colour_rgb = np.median(img[core], axis=0)
    m.colour = _nearest(m.colour_rgb, COLOURS)
    axis = m.colour_rgb - bg
    coverage = ((img - bg) @ axis) / max(float(axis @ axis), 1e-6)
    obj = _components((coverage > 0.5) & _grow(coarse[0]))[0]
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    centre_px = ((x0 + x1) / 2, (y0 + y1) / 2)
    ious = {}
    for shape in SHAPES:
        t = _template(shape, centre_px, side, w)
        ious[shape] = float((t & obj).sum() / max(1, (t | obj).sum()))
    k = max(1, round(CORNER_PATCH * side))
    filled = np.clip(coverage, 0.0, 1.0) * _grow(obj)
    m.corner_fill = float(np.mean([filled[ys_, xs_].mean() for ys_ in (slice(y0, y0 + k), slice(y1 - k, y1))
                                   for xs_ in (slice(x0, x0 + k), slice(x1 - k, x1))]))
    m.shape = _classify_shape(ious, m.corner_fill)
    m.shape_iou, m.shape_ious = ious[m.shape], ious
    m.extent = side / w
    m.centre = (centre_px[0] / w, centre_px[1] / h)
    m.touches_border = bool(y0 == 0 or x0 == 0 or y1 == h or x1 == w)
    background = ~_grow(coarse[0])  # everything not within one pixel of the object
    m.background_noise = float(dist[background].mean()) if background.any() else 0.0
    m.speck_fraction = float((dist[background] > OBJECT_DISTANCE).sum()) / (h * w)
    m.fill_noise = float(np.linalg.norm(img[core] - m.colour_rgb, axis=-1).mean())
    return m


def _shape_margins(ious: dict[str, float], corner_fill: float) -> dict[str, float]:
    """Per shape, how far the blob is on the side of being that shape (> 0 for the classified one)."""
    triangle = ious["triangle"] - max(ious["circle"], ious["square"])
    squareness = corner_fill - CORNER_SQUARE
    return {"triangle": triangle, "square": min(-triangle, squareness), "circle": min(-triangle, -squareness)}


def _classify_shape(ious: dict[str, float], corner_fill: float) -> str:
    margins = _shape_margins(ious, corner_fill)
    return max(margins, key=margins.get)


def size_class(extent: float) -> str:
    return "small" if extent < SIZE_BOUNDS[0] else "large" if extent > SIZE_BOUNDS[1] else ""


def _palette_margin(rgb: np.ndarray, asked: str, palette: dict[str, tuple[int, int, int]]) -> float:
    """Distance to the nearest other palette entry minus distance to the asked one (> 0: asked is nearest)."""
    d = {name: float(np.linalg.norm(rgb - np.array(c, dtype=np.float64))) for name, c in palette.items()}
    return min(v for k, v in d.items() if k != asked) - d[asked]


def margin(key: str, m: Measurement, caption: str) -> float:
    """How far the measurement is on the "yes" side of the question's threshold (≥ 0: yes), in the
    question's own unit (RGB distance, IoU, fraction of the image side, ...)."""
    spec = parse_caption(caption)
    if key == "background":
        return _palette_margin(m.background_rgb, spec.background, BACKGROUNDS)
    if not m.found:
        return -1.0
    if key == "colour":
        return _palette_margin(m.colour_rgb, spec.colour, COLOURS)
    if key == "shape":
        return min(_shape_margins(m.shape_ious, m.corner_fill)[spec.shape], m.shape_ious[spec.shape] - SHAPE_MIN_IOU)
    if key == "size":
        lo, hi = SIZE_BOUNDS
        return {"small": lo - m.extent, "large": m.extent - hi, "": min(m.extent - lo, hi - m.extent)}[spec.size]
    if key == "centred":
        return CENTRE_TOLERANCE - max(abs(m.centre[0] - 0.5), abs(m.centre[1] - 0.5))
    if key == "single":
        return 1.0 if m.components == 1 else -1.0
    if key == "inside":
        return -1.0 if m.touches_border else 1.0
    if key == "clean_background":
        return min(BACKGROUND_NOISE - m.background_noise, (SPECK_FRACTION - m.speck_fraction) * BACKGROUND_NOISE / SPECK_FRACTION)
    if key == "solid_fill":
        return FILL_NOISE - m.fill_noise
    raise KeyError(f"unknown toy checklist question {key!r}")


# graded answers: P(yes) = σ(margin / scale), one scale per question in its margin's unit
MARGIN_SCALE = {"colour": 10.0, "background": 10.0, "shape": 0.03, "size": 0.02, "centred": 0.02, "single": 0.2,
                "inside": 0.2, "clean_background": 2.0, "solid_fill": 5.0}


TOY_CHECKLIST = Checklist(
    name="toy-checklist",
    questions=(
        Question("colour", "Is the shape the colour the caption asks for?", "alignment", 0.20),
        Question("shape", "Is the shape the kind the caption asks for (circle, square, triangle)?", "alignment", 0.20),
        Question("background", "Is the background the colour the caption asks for?", "alignment", 0.10),
        Question("size", "Is the shape the size the caption asks for (small, medium, large)?", "alignment", 0.10),
        Question("centred", "Is the shape in the middle of the image?", "composition", 0.10),
        Question("single", "Is there exactly one shape?", "composition", 0.10),
        Question("inside", "Is the shape fully inside the frame?", "composition", 0.05),
        Question("clean_background", "Is the background plain, without noise or stray marks?", "quality", 0.10),
        Question("solid_fill", "Is the shape filled with one solid colour?", "quality", 0.05),
    ),
)


class ToyMeasurementBackend:
    """Answers the toy checklist's questions by `measure`-ing each image.

    graded=True (default) gives P(yes) = σ(margin / scale), like a VLM's yes-probability: an image that is
    barely centred scores less than a well-centred one, so scores rarely tie. graded=False gives hard
    0/1 answers; both agree on which side of 0.5 every answer is.
    """

    def __init__(self, graded: bool = True):
        self.graded = graded

    def answer(self, images: Images, prompts: Sequence[str], questions: Sequence[Question]) -> torch.Tensor:
        check_batch(images, prompts)
        for prompt in prompts:
            try:
                parse_caption(prompt)
            except ValueError:
                raise DataError(f"toy-checklist judges the toy world's images only, and {prompt!r} is not a toy caption "
                                "('a [small|large] <colour> <shape> on a <background> background')") from None
        measured = [(measure(arr), p) for arr, p in zip(as_uint8_arrays(images), prompts)]  # once per image, not per question
        margins = [[margin(q.key, m, p) for q in questions] for m, p in measured]
        margins = torch.tensor(margins, dtype=torch.float64).reshape(len(margins), len(questions))
        if not self.graded:
            return (margins >= 0).float()
        scale = torch.tensor([MARGIN_SCALE[q.key] for q in questions], dtype=torch.float64)
        return torch.sigmoid(margins / scale).float()


def toy_checklist_scorer(temperature: float = 0.1, graded: bool = True) -> ChecklistScorer:
    """The `toy-checklist` scorer; overall ∈ [-1, 1] (weights sum to 1). `prefer` is Bradley–Terry with
    temperature 0.1 (one alignment question's swing, 0.4, gives P ≈ 0.98), marked uncalibrated."""
    return ChecklistScorer("toy-checklist", TOY_CHECKLIST, ToyMeasurementBackend(graded), temperature)


def toy_checklist_identity(graded: bool = True, temperature: float = 0.1) -> dict:
    """Everything that decides the toy checklist's scores: questions, weights, thresholds, grading (not the
    `prefer` temperature). `Question.signed` came after the bench's hashes were frozen: it is recorded only
    where a question is unsigned (none are), so the scorer hash in docs/toy_world.md still holds."""
    import dataclasses

    thresholds = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, tuple, dict)) and k != "TOY_CHECKLIST"}
    questions = [{k: v for k, v in dataclasses.asdict(q).items() if k != "signed" or not v} for q in TOY_CHECKLIST.questions]
    return {"questions": questions, "intercept": TOY_CHECKLIST.intercept, "thresholds": thresholds, "graded": graded}
