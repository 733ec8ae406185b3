"""Image decoding safety and the deterministic cache-time geometry (no model needed)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data import CorruptImageError
from diffalign.data.images import crop_offset, decode_image, draw_augments, place_image, prepare_images, resized_size


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _ramp(h: int, w: int) -> Image.Image:
    """Red grows left to right: after any crop, a flip shows as a decreasing row."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr)


def _mirrored(placed) -> bool:
    return bool(placed.pixels[0, 16, 0] > placed.pixels[0, 16, -1])


def _halves(h: int = 40, w: int = 60) -> Image.Image:
    """Left half red, right half blue: a horizontal flip is visible."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ decoding


def test_decodes_common_modes_to_rgb():
    rgba = Image.new("RGBA", (9, 7), (10, 20, 30, 0))  # fully transparent -> white
    cases = {
        "RGBA": rgba,
        "L": Image.new("L", (9, 7), 100),
        "P": Image.new("RGB", (9, 7), (1, 2, 3)).convert("P"),
        "LA": Image.new("LA", (9, 7), (50, 255)),
        "I;16": Image.fromarray(np.full((7, 9), 65535, dtype=np.uint16)),
        "CMYK": Image.new("CMYK", (9, 7), (0, 0, 0, 0)),
    }
    for mode, im in cases.items():
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out = decode_image(_encode(im, fmt), mode)
        assert out.mode == "RGB" and out.size == (9, 7), mode
    assert decode_image(_encode(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(_encode(cases["I;16"])).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (30, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = decode_image(_encode(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image data"),
        (b"this is text, not an image", "not a recognised image"),
        (_encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")[:300], "cannot decode"),
        (_encode(Image.new("RGB", (8, 8)), "PPM"), "not a recognised image"),  # not in the accepted formats
    ],
)
def test_corrupt_data_raises_with_reason(data, reason):
    with pytest.raises(CorruptImageError, match=reason) as e:
        decode_image(data, "x.parquet:3 image 1")
    assert "x.parquet:3 image 1" in str(e.value) and reason in e.value.reason


def test_missing_file_is_a_corrupt_image(tmp_path):
    with pytest.raises(CorruptImageError, match="not found"):
        decode_image(tmp_path / "nope.png")


@pytest.mark.parametrize("side", [40, 60])  # 1600 px: above 1x the limit; 3600 px: above 2x (Pillow's own error)
def test_images_above_max_pixels_are_refused_before_decoding(monkeypatch, side):
    data = _encode(Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        with pytest.raises(CorruptImageError, match="too large"):
            decode_image(data)


# ------------------------------------------------------------------------------------------ geometry


def test_resize_short_side_and_center_crop_offsets():
    assert resized_size(48, 64, 32) == (32, 43)
    assert resized_size(80, 40, 32) == (64, 32)
    assert resized_size(1, 1, 32) == (32, 32)
    assert crop_offset(43, 32, "center", 0.9) == 6  # round(5.5) as diffusers
    for u in (0.0, 0.5, 0.999999):
        assert 0 <= crop_offset(43, 32, "random", u) <= 11
    assert crop_offset(43, 32, "random", 0.0) == 0 and crop_offset(43, 32, "random", 0.999999) == 11


def test_place_image_returns_pixels_size_and_crop():
    aug = draw_augments(0, "s", 1, random_flip=False, pairing="shared")[0]
    placed = place_image(_halves(48, 64), 32, "center", aug)
    assert placed.pixels.shape == (3, 32, 32) and placed.pixels.dtype == torch.float32
    assert placed.pixels.min() >= -1 and placed.pixels.max() <= 1
    assert placed.original_size == (48, 64) and placed.crop_top_left == (0, 6) and not placed.flipped


def test_flip_is_visible_in_pixels():
    flip = next(a for i in range(50) for a in draw_augments(0, f"s{i}", 1, True, "shared") if a.flip)
    no = next(a for i in range(50) for a in draw_augments(0, f"s{i}", 1, True, "shared") if not a.flip)
    left_red = lambda p: p.pixels[0, 16, 2] > 0.9  # noqa: E731
    assert left_red(place_image(_halves(), 32, "center", no))
    assert not left_red(place_image(_halves(), 32, "center", flip))


def test_draws_are_deterministic_hash_based_and_shared():
    a = draw_augments(3, "file.parquet:7", 2, True, "shared")
    torch.manual_seed(123)
    np.random.seed(5)
    assert draw_augments(3, "file.parquet:7", 2, True, "shared") == a  # no global RNG involved
    assert a[0] == a[1]
    per = [draw_augments(3, f"id{i}", 2, True, "per_image") for i in range(40)]
    assert any(p[0].flip != p[1].flip for p in per)
    assert all(p[0] != p[1] for p in per)  # independent crop draws
    assert not any(a.flip for a in draw_augments(3, "x", 2, False, "per_image"))


def test_shared_pairing_gives_both_images_the_same_flip_and_relative_crop():
    imgs = [_encode(_ramp(40, 60)), _encode(_ramp(40, 90))]  # different sizes
    for i in range(20):
        sid = f"pair{i}"
        out = prepare_images(imgs, sid, resolution=32, crop="random", random_flip=True, pairing="shared", seed=1)
        assert out[0].flipped == out[1].flipped == _mirrored(out[0]) == _mirrored(out[1])
        u = draw_augments(1, sid, 2, True, "shared")[0].u_left
        assert out[0].crop_top_left[1] == crop_offset(48, 32, "random", u)
        assert out[1].crop_top_left[1] == crop_offset(72, 32, "random", u)
    per = [prepare_images(imgs, f"pair{i}", resolution=32, crop="random", random_flip=True, pairing="per_image", seed=1) for i in range(20)]
    assert any(_mirrored(p[0]) != _mirrored(p[1]) for p in per)


def test_prepare_images_names_the_bad_image():
    good = _encode(_halves())
    with pytest.raises(CorruptImageError, match=r"s:1 image 1"):
        prepare_images([good, b"junk"], "s:1", resolution=32, crop="center", random_flip=False, pairing="shared", seed=0)
