"""One painter for the image grids diffalign writes: validation rows, compare's disagreement pairs, the toy bench.

A grid is rows of equal cells on a white page. Each image is fitted into its cell (aspect kept, top-left
aligned): enlarged with nearest-neighbour so small images (the toy world's 32 px) stay crisp, shrunk with
bicubic. Text is PIL's default font in lines of `LINE` px, each drawn 2 px from the left and 1 px below the
line's top: an optional header line of column labels above everything, and optional caption lines above
each row's images (a prompt, a score per scorer).

    ┌──────────┬──────────┐
    │ label 0  │ label 1  │   header: LINE + 2·header_pad px
    ├──────────┴──────────┤
    │ caption lines       │   caption_lines · LINE px
    ├──────────┬──────────┤
    │ image    │ image    │   one cell high
    └──────────┴──────────┘   ... and so on for every row
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageOps

LINE = 14  # px per line of text (PIL's default font is about 11 px tall)


def fit(image: Image.Image, cell: tuple[int, int]) -> Image.Image:
    """`image` scaled to fit in `cell` (w, h), aspect kept: nearest-neighbour when it grows, bicubic otherwise."""
    grows = image.width < cell[0] and image.height < cell[1]
    return ImageOps.contain(image, cell, Image.Resampling.NEAREST if grows else Image.Resampling.BICUBIC)


def paint_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    cell: int | tuple[int, int] | None = None,
    scale: int = 1,
    column_labels: Sequence[str] = (),
    header_pad: int = 0,
    captions: Sequence[Sequence[str]] | None = None,
    caption_lines: int | None = None,
) -> Image.Image:
    """Paint `rows` of images into one RGB image (see the module docstring for the layout).

    cell: the side (int) or (width, height) of every cell; default: the first image's size times `scale`.
    column_labels: one label per column, on a header line `header_pad` px taller at the top and bottom;
        no header without labels.
    captions: per row, its lines of text, above its images; caption_lines: the lines every row makes room
        for (default: the most any row has), so that rows line up even when their captions differ.
    The grid is as wide as its widest row or its labels; a grid without rows still has one blank row
    (`cell` must then be given).
    """
    if cell is None:
        if not rows or not rows[0]:
            raise ValueError("paint_grid: give `cell` for a grid without images")
        cell = (rows[0][0].width * scale, rows[0][0].height * scale)
    elif scale != 1:
        raise ValueError("paint_grid: `scale` sizes the default cell; give `cell` or `scale`, not both")
    cell_w, cell_h = (cell, cell) if isinstance(cell, int) else cell
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"paint_grid: {len(captions)} captions for {len(rows)} rows")
    if caption_lines is None:
        caption_lines = max((len(c) for c in captions), default=0) if captions is not None else 0
    columns = max([len(column_labels), *(len(r) for r in rows)])
    header = LINE + 2 * header_pad if column_labels else 0
    band = LINE * caption_lines
    grid = Image.new("RGB", (cell_w * columns, header + max(1, len(rows)) * (band + cell_h)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((c * cell_w + 2, header_pad + 1), label, fill="black")
    for r, row in enumerate(rows):
        top = header + r * (band + cell_h)
        for c, image in enumerate(row):
            grid.paste(fit(image, (cell_w, cell_h)), (c * cell_w, top + band))
        for n, text in enumerate(captions[r] if captions is not None else ()):
            draw.text((2, top + 1 + LINE * n), text, fill="black")
    return grid
