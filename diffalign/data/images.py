"""Safe image decoding and the deterministic cache-time geometry (resize, crop, flip) of an item's K images.

Decoding (`decode_image`): only common raster formats are opened; the pixel count is checked from the
header before any pixel is decoded (above `PIL.Image.MAX_IMAGE_PIXELS` is refused, and Pillow's
`DecompressionBombWarning` is turned into an error); truncated or corrupt data, a missing file or an
unknown format raise `CorruptImageError` with the reason. EXIF orientation is applied; transparency is
composited on white; 16-bit and float greyscale are scaled to 8 bit; the result is RGB.

Geometry (`place_image`), in this order, as diffusers' SDXL scripts do:
1. resize so the short side equals `resolution` (`data.resize`): 'bicubic' = PIL bicubic, long side
   rounded; 'official' = torchvision's `Resize(resolution, interpolation=BILINEAR)` on a PIL image, i.e.
   PIL bilinear with the long side truncated to int(resolution · long / short), skipped when the size
   already matches (torchvision 0.19+ `_compute_resized_output_size`). Both are PIL's antialiased
   convolution resize;
2. flip horizontally if the item's draw says so (`data.flip_at = 'cache'`);
3. crop a `resolution`² square: centred (torchvision `CenterCrop`'s rounding), or at a random offset.
The reported crop top-left is in the resized (and flipped) frame, i.e. exactly the rows/columns cut
off the image the VAE sees, which is what SDXL's `crops_coords_top_left` means.

With `data.flip_at = 'train'` no flip is applied at cache time; instead each placed image also carries
its mirror (the cropped pixels flipped left-right: the official Diffusion-DPO order resize, crop, flip),
so the cache can hold both orientations and training can draw one per access. The crop top-left stays
that of the crop, for both orientations (diffusers' SDXL scripts do not move it when they flip).

Draws (`draw_augments`) are a hash of (seed, source_id, what[, image index]): no global RNG, so a
rebuilt or resumed cache makes the same choices. With `pairing = "shared"` every image of an item gets
the same flip and the same crop draw u ∈ [0, 1) per axis; if the images differ in size, u is mapped to
each image's own range (offset = floor(u · (size - resolution + 1))), i.e. the same *relative* crop
position. With `pairing = "per_image"` each image has its own draws (the official Diffusion-DPO code).
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffalign.data.errors import CorruptImageError
from diffalign.randomness import hash_int

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings mutates global state; Image.open only reads headers


def decode_image(src: bytes | Path | str, where: str | None = None) -> Image.Image:
    """Decode bytes or a file to an RGB `PIL.Image` (EXIF orientation applied, transparency on white);
    raise `CorruptImageError(reason)` on anything unsafe."""
    return _to_rgb(ImageOps.exif_transpose(open_image(src, where)))


def open_image(src: bytes | Path | str, where: str | None = None) -> Image.Image:
    """Decode bytes or a file to a `PIL.Image` as stored (any mode, no EXIF rotation: what reward models'
    own loaders see), with `decode_image`'s safety checks."""
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise CorruptImageError("empty image data", where)
            fp = io.BytesIO(src)
        else:
            fp = open(src, "rb")
    except FileNotFoundError:
        raise CorruptImageError(f"image file not found: {src}", where) from None
    except OSError as e:
        raise CorruptImageError(f"cannot read image file {src}: {e}", where) from None
    try:
        with fp:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=FORMATS)
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and w * h > limit:
                raise CorruptImageError(f"too large: {w}x{h} = {w * h} pixels exceeds Image.MAX_IMAGE_PIXELS = {limit}", where)
            if w < 1 or h < 1:
                raise CorruptImageError(f"empty image ({w}x{h})", where)
            im.load()
            return im
    except CorruptImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptImageError(f"too large (decompression bomb check): {e}", where) from None
    except UnidentifiedImageError:
        raise CorruptImageError(f"not a recognised image (accepted formats: {', '.join(FORMATS)})", where) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise CorruptImageError(f"cannot decode ({type(e).__name__}: {e})", where) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


@dataclass(frozen=True)
class Augment:
    """Cache-time decisions for one image: flip, and where a random crop lands (u ∈ [0, 1) per axis)."""

    flip: bool
    u_top: float
    u_left: float


def _uniform(seed: int, source_id: str, what: str, index: int | None) -> float:
    key = f"{seed}\0{source_id}\0{what}\0{'' if index is None else index}".encode()
    return hash_int(key) / 2.0**64


def draw_augments(seed: int, source_id: str, k: int, random_flip: bool, pairing: str) -> list[Augment]:
    """The K images' decisions: identical under `pairing='shared'`, independent under 'per_image'."""
    out = []
    for i in range(k):
        idx = None if pairing == "shared" else i
        flip = random_flip and _uniform(seed, source_id, "flip", idx) < 0.5
        out.append(Augment(flip, _uniform(seed, source_id, "crop_top", idx), _uniform(seed, source_id, "crop_left", idx)))
    return out


@dataclass
class PlacedImage:
    """An image ready for the VAE: pixels (3, res, res) in [-1, 1], true size (h, w), crop (top, left), flip;
    `mirrored`: the pixels flipped left-right, when both orientations are cached (`data.flip_at = 'train'`)."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    flipped: bool
    mirrored: torch.Tensor | None = None


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "official": Image.Resampling.BILINEAR}


def resized_size(h: int, w: int, resolution: int, resize: str = "bicubic") -> tuple[int, int]:
    """(h, w) after scaling the short side to `resolution`. 'bicubic': long side rounded, never below `resolution`;
    'official': long side int(resolution · long / short), as torchvision's `Resize(resolution)` computes it."""
    if resize == "official":
        long = int(resolution * max(h, w) / min(h, w))
        return (resolution, long) if h <= w else (long, resolution)
    s = resolution / min(h, w)
    return max(resolution, round(h * s)), max(resolution, round(w * s))


def crop_offset(size: int, resolution: int, crop: str, u: float) -> int:
    """Crop start along one axis of length `size`: centred (diffusers' rounding) or floor(u · (range + 1))."""
    room = size - resolution
    if crop == "center":
        return max(0, int(round(room / 2.0)))
    return min(int(u * (room + 1)), room)


def _to_pixels(im: Image.Image) -> torch.Tensor:
    """(3, h, w) float32 in [-1, 1] from an RGB image."""
    arr = torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return arr.to(torch.float32).div_(127.5).sub_(1.0)


def place_image(im: Image.Image, resolution: int, crop: str, aug: Augment, resize: str = "bicubic") -> PlacedImage:
    """Resize (short side, `resize` as `data.resize`), flip, crop one RGB image as described in the module docstring."""
    h, w = im.height, im.width
    nh, nw = resized_size(h, w, resolution, resize)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), RESAMPLING[resize])
    if aug.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top = crop_offset(nh, resolution, crop, aug.u_top)
    left = crop_offset(nw, resolution, crop, aug.u_left)
    im = im.crop((left, top, left + resolution, top + resolution))
    return PlacedImage(_to_pixels(im), (h, w), (top, left), aug.flip)


def with_mirror(placed: PlacedImage) -> PlacedImage:
    """`placed` with `mirrored` set: its pixels flipped left-right (same crop, same time ids)."""
    placed.mirrored = placed.pixels.flip(-1)
    return placed


def prepare_images(
    images: list[bytes | Path], source_id: str, *, resolution: int, crop: str, random_flip: bool, pairing: str, seed: int,
    resize: str = "bicubic", flip_at: str = "cache",
) -> list[PlacedImage]:
    """Decode and place all K images of one item (raises `CorruptImageError` naming the source_id and image).

    `flip_at = 'train'` (with `random_flip`): no cache-time flip; every image carries its mirror instead."""
    both = random_flip and flip_at == "train"
    augs = draw_augments(seed, source_id, len(images), random_flip and not both, pairing)
    decoded = (decode_image(src, f"{source_id} image {i}") for i, src in enumerate(images))
    placed = [place_image(im, resolution, crop, aug, resize) for im, aug in zip(decoded, augs)]
    return [with_mirror(p) for p in placed] if both else placed
