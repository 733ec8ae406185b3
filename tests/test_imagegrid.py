"""The one grid painter draws, pixel for pixel, the grids the three hand-written painters drew before it.

Each `_before_*` below is the painter as it was (validation's `image_grid`, compare's `disagreement_grid`, the
toy bench's `_grid`), kept here as the reference the shared painter must reproduce exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from diffalign.data.images import decode_image
from diffalign.eval.compare import disagreement_grid, disagreements, pair
from diffalign.eval.folderscore import FolderScores
from diffalign.eval.imagefolder import write_folder
from diffalign.imagegrid import LINE, paint_grid


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ before


def _before_validation(rows):
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


def _before_compare(folder_a, folder_b, a, b, p, scorers, k=8, side=256):
    rows = disagreements(a, b, p, scorers, k)
    text_h, head = 14 * (1 + len(scorers)), 16
    grid = Image.new("RGB", (2 * side, head + max(1, len(rows)) * (side + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 2), f"A: {folder_a.name}", fill="black")
    draw.text((side + 2, 2), f"B: {folder_b.name}", fill="black")
    for r, j in enumerate(rows):
        top = head + r * (side + text_h)
        for c, (folder, res, idx) in enumerate(((folder_a, a, p.a[j]), (folder_b, b, p.b[j]))):
            image = decode_image(folder / res.records[idx].file)
            upscale = max(image.size) < side
            image = ImageOps.contain(image, (side, side), Image.Resampling.NEAREST if upscale else Image.Resampling.BICUBIC)
            grid.paste(image, (c * side, top + text_h))
        draw.text((2, top + 1), a.records[p.a[j]].prompt[:90], fill="black")
        for n, s in enumerate(scorers, 1):
            draw.text((2, top + 1 + 14 * n), f"{s}: A {a.scores[s][p.a[j]]:.4f}  B {b.scores[s][p.b[j]]:.4f}", fill="black")
    return grid


def _before_toybench(columns, rows, scale=3):
    names = list(columns)
    side = columns[names[0]][0].width * scale
    head = 14
    grid = Image.new("RGB", (side * len(names), head + side * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((c * side + 2, 1), name, fill="black")
        for r in range(rows):
            grid.paste(columns[name][r].resize((side, side), Image.Resampling.NEAREST), (c * side, head + r * side))
    return grid


# ------------------------------------------------------------------------------------------ after


def test_validation_rows():
    rows = [[_noise(32, 24, i) for i in range(4)], [_noise(32, 24, 10 + i) for i in range(3)]]  # LoRA: trained, base
    assert _same(paint_grid(rows), _before_validation(rows))
    assert _same(paint_grid(rows[:1]), _before_validation(rows[:1]))


def test_toybench_columns():
    columns = {name: [_noise(32, 32, 7 * c + r) for r in range(5)] for c, name in enumerate(["base", "dpo", "self_npo_long_name"])}
    rows = 4
    after = paint_grid([[columns[n][r] for n in columns] for r in range(rows)], scale=3, column_labels=list(columns))
    assert _same(after, _before_toybench(columns, rows))


@pytest.mark.parametrize("k", [3, 0])
def test_compare_disagreements(tmp_path, k):
    sizes = [(32, 32), (300, 200), (256, 256), (100, 180), (400, 400), (20, 31)]  # enlarged, shrunk, as is, either aspect
    prompts = [f"a prompt number {i}, long enough to be cut at ninety characters by the grid's caption line {i}" for i in range(6)]
    ra = write_folder(tmp_path / "runA", [_noise(w, h, i) for i, (w, h) in enumerate(sizes)], prompts, list(range(6)))
    rb = write_folder(tmp_path / "runB", [_noise(h, w, 50 + i) for i, (w, h) in enumerate(sizes)], prompts, list(range(6)))
    rng = np.random.default_rng(0)
    a = FolderScores(ra, {"s1": rng.normal(size=6), "s2": rng.normal(size=6)})
    b = FolderScores(rb, {"s1": rng.normal(size=6), "s2": rng.normal(size=6)})
    p = pair(ra, rb)
    for scorers in (["s1"], ["s1", "s2"]):
        after = disagreement_grid(tmp_path / "runA", tmp_path / "runB", a, b, p, scorers, k=k)
        assert _same(after, _before_compare(tmp_path / "runA", tmp_path / "runB", a, b, p, scorers, k=k))


def test_layout():
    im = _noise(10, 10, 0)
    grid = paint_grid([[im, im], [im]], cell=20, column_labels=["x"], header_pad=1, captions=[["a", "b"], []])
    # width: the widest row; height: header (LINE + 2) + 2 rows of (two caption lines + a 20 px cell)
    assert grid.size == (40, LINE + 2 + 2 * (2 * LINE + 20))
    blank = paint_grid([], cell=(8, 6), captions=[], caption_lines=1, column_labels=["a", "b"])
    assert blank.size == (16, LINE + LINE + 6) and np.asarray(blank)[LINE:].min() == 255  # one blank row
    with pytest.raises(ValueError, match="give `cell`"):
        paint_grid([])
    with pytest.raises(ValueError, match="not both"):
        paint_grid([[im]], cell=4, scale=2)
