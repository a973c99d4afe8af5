"""Labelled X/Y image grids (pure Pillow): the evaluation's checkpoint x seed and checkpoint x prompt grids.

Layout of a grid of C columns and R rows of W x H cells:

    +------------------------------------------+
    | title (one line, optional)               |   title_height
    |        | col 0 label | col 1 label | ... |   label_height
    | row 0  |  cell 0,0   |  cell 1,0   |     |   H each
    | row 1  |  cell 0,1   |  ...        |     |
    +------------------------------------------+
      left      W each

so the image is (left + C x W) by (title_height + label_height + R x H) pixels; `grid_layout`
computes the margins (from the font size, itself from the cell height) before anything is drawn.
Labels longer than their space are cut with an ellipsis.

    image = grid_image([[a0, a1], [b0, b1]], ["base", "epoch 15"], ["seed 0", "seed 1"], title="photo of ohwx man")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK = "white", "black"
PAD = 4  # pixels around each label


@dataclass(frozen=True)
class GridLayout:
    columns: int
    rows: int
    cell: tuple[int, int]  # (width, height) of every image
    left: int  # width of the row-label margin
    title_height: int
    label_height: int

    @property
    def top(self) -> int:
        return self.title_height + self.label_height

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * self.cell[0], self.top + self.rows * self.cell[1]

    def cell_origin(self, column: int, row: int) -> tuple[int, int]:
        return self.left + column * self.cell[0], self.top + row * self.cell[1]


def font_size(cell_height: int) -> int:
    """Labels scale with the images: 12 px for 64 px cells, 32 px for 1024 px cells."""
    return max(12, min(32, cell_height // 24))


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def grid_layout(columns: int, rows: int, cell: tuple[int, int], row_labels: Sequence[str],
                title: str | None = None) -> GridLayout:
    """Margins for the labels; the row margin fits the widest row label, at most two cells wide."""
    if columns < 1 or rows < 1:
        raise ValueError(f"a grid needs at least one column and one row, got {columns} x {rows}")
    size = font_size(cell[1])
    font = label_font(size)
    widest = max((text_width(font, label) for label in row_labels), default=0)
    line = size + 2 * PAD
    return GridLayout(columns, rows, cell, left=min(widest + 2 * PAD, 2 * cell[0]),
                      title_height=line if title else 0, label_height=line)


def fit_text(font, text: str, width: int) -> str:
    """`text`, cut with an ellipsis so that it fits `width` pixels."""
    if text_width(font, text) <= width:
        return text
    while text and text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def grid_image(cells: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
               title: str | None = None) -> Image.Image:
    """One RGB image of `cells[column][row]` with labels; all cells must be one size."""
    if len(cells) != len(column_labels) or any(len(column) != len(row_labels) for column in cells):
        raise ValueError(f"grid: {len(cells)} columns of {[len(c) for c in cells]} cells for "
                         f"{len(column_labels)} column labels and {len(row_labels)} row labels")
    sizes = {image.size for column in cells for image in column}
    if len(sizes) != 1:
        raise ValueError(f"grid: cells differ in size {sorted(sizes)}; generate them at one resolution")
    layout = grid_layout(len(cells), len(row_labels), sizes.pop(), row_labels, title)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    for c, column in enumerate(cells):
        for r, image in enumerate(column):
            canvas.paste(image.convert("RGB"), layout.cell_origin(c, r))
    _draw_labels(ImageDraw.Draw(canvas), layout, column_labels, row_labels, title)
    return canvas


def _draw_labels(draw: ImageDraw.ImageDraw, layout: GridLayout, column_labels: Sequence[str],
                 row_labels: Sequence[str], title: str | None) -> None:
    font = label_font(font_size(layout.cell[1]))
    width, _ = layout.size
    if title:
        draw.text((PAD, PAD), fit_text(font, title, width - 2 * PAD), fill=INK, font=font)
    for c, label in enumerate(column_labels):
        x, _ = layout.cell_origin(c, 0)
        draw.text((x + PAD, layout.title_height + PAD), fit_text(font, label, layout.cell[0] - 2 * PAD),
                  fill=INK, font=font)
    for r, label in enumerate(row_labels):
        _, y = layout.cell_origin(0, r)
        draw.text((PAD, y + PAD), fit_text(font, label, layout.left - 2 * PAD), fill=INK, font=font)


def thumbnail(image: Image.Image, max_side: int) -> Image.Image:
    """A copy no larger than max_side on its longer side (for artifacts)."""
    copy = image.copy()
    copy.thumbnail((max_side, max_side))
    return copy
