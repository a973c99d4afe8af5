"""Grid layout and labels: size = label margins + columns x rows cells; labels are drawn and fit."""

import numpy as np
import pytest
from PIL import Image

from likeness.tasks.evaluate.image_grid import fit_text, font_size, grid_image, grid_layout, label_font, text_width


def cell(colour: tuple[int, int, int], size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_size_is_margins_plus_columns_times_rows():
    cells = [[cell((255, 0, 0)), cell((0, 255, 0))] for _ in range(3)]  # 3 columns, 2 rows
    image = grid_image(cells, ["base", "epoch 2", "epoch 4"], ["seed 0", "seed 1"], title="photo of ohwx man")
    layout = grid_layout(3, 2, (64, 64), ["seed 0", "seed 1"], title="photo of ohwx man")
    assert image.size == layout.size == (layout.left + 3 * 64, layout.title_height + layout.label_height + 2 * 64)
    assert layout.left > 0 and layout.title_height == layout.label_height > 0
    assert grid_layout(3, 2, (64, 64), ["seed 0"]).title_height == 0  # no title, no title line


def test_cells_land_where_the_layout_says():
    colours = [[(255, 0, 0), (0, 0, 255)], [(0, 255, 0), (255, 255, 0)]]
    image = np.asarray(grid_image([[cell(c) for c in column] for column in colours], ["a", "b"], ["r0", "r1"]))
    layout = grid_layout(2, 2, (64, 64), ["r0", "r1"])
    for c, column in enumerate(colours):
        for r, colour in enumerate(column):
            x, y = layout.cell_origin(c, r)
            assert tuple(image[y + 32, x + 32]) == colour


def test_labels_are_drawn_in_the_margins():
    image = np.asarray(grid_image([[cell((128, 128, 128))]], ["epoch 300"], ["seed 7"], title="a title"))
    layout = grid_layout(1, 1, (64, 64), ["seed 7"], title="a title")
    label_band = image[layout.title_height:layout.top, layout.left:]
    row_band = image[layout.top:, :layout.left]
    title_band = image[:layout.title_height]
    for band in (label_band, row_band, title_band):
        assert (band < 100).any(), "no dark text pixels in a label margin"
    blank = np.asarray(grid_image([[cell((128, 128, 128))]], [""], [""]))
    assert not (blank[:layout.label_height] < 100).any()


def test_long_labels_are_cut_to_fit():
    font = label_font(font_size(64))
    text = fit_text(font, "a very long prompt that never fits in one small cell", 56)
    assert text.endswith("…") and text_width(font, text) <= 56
    assert fit_text(font, "ok", 56) == "ok"


def test_font_scales_with_the_cells():
    assert font_size(64) == 12 and font_size(1024) == 32


def test_mismatched_cells_are_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        grid_image([[cell((0, 0, 0))], [cell((0, 0, 0), (32, 32))]], ["a", "b"], ["r"])
    with pytest.raises(ValueError, match="column labels"):
        grid_image([[cell((0, 0, 0))]], ["a", "b"], ["r"])
