"""Resize stage: mogrify's geometry, EXIF orientation, every colour mode, originals untouched."""

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.settings import CaptionSource, Concept, ResizeSettings
from likeness.stages import load_rows
from likeness.tasks.resize import encode, fit_inside, prepare_image, resize_stage, to_rgb
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace

WHITE = (255, 255, 255)


# (width, height, target) -> (scaled width, scaled height, left, top), measured with ImageMagick
# 6.9.11 (Debian's `imagemagick`): the bounding box of a black WxH canvas after
#   convert -size WxH xc:black -resize TxT -background white -gravity center -extent TxT pgm:-
# Sides round half up (floor(side x scale + 0.5): 500.5 -> 501, 512.25 -> 512); the offset is
# T // 2 - side // 2, which for an odd T - side is one more than (T - side) // 2 (767 -> 129).
IMAGEMAGICK = [
    ((4000, 3000, 1024), (1024, 768, 0, 128)),    # landscape camera photo
    ((3000, 4000, 1024), (768, 1024, 128, 0)),    # portrait
    ((4032, 3024, 1024), (1024, 768, 0, 128)),    # iPhone
    ((6000, 4000, 1024), (1024, 683, 0, 171)),    # 3:2 camera: 682.67 -> 683, odd difference
    ((1080, 1920, 1024), (576, 1024, 224, 0)),    # 9:16 phone screenshot
    ((2048, 2048, 1024), (1024, 1024, 0, 0)),     # square
    ((500, 500, 1024), (1024, 1024, 0, 0)),       # small: enlarged, as -resize does
    ((10, 5, 1024), (1024, 512, 0, 256)),         # tiny
    ((1000, 333, 1024), (1024, 341, 0, 342)),     # 340.992 -> 341; 683 left over -> 342 above
    ((1, 1000, 1024), (1, 1024, 512, 0)),         # a 1 px sliver stays 1 px
    ((12000, 9000, 1024), (1024, 768, 0, 128)),   # huge
    ((641, 480, 1024), (1024, 767, 0, 129)),      # 766.8 -> 767, not (1024 - 767) // 2 = 128
    ((480, 641, 1024), (767, 1024, 129, 0)),
    ((1023, 1000, 1024), (1024, 1001, 0, 12)),
    ((2048, 1001, 1024), (1024, 501, 0, 262)),    # exactly 500.5: half up
    ((4096, 2050, 1024), (1024, 513, 0, 256)),    # exactly 512.5: half up
    ((4096, 2049, 1024), (1024, 512, 0, 256)),    # 512.25: down
    ((2048, 3, 1024), (1024, 2, 0, 511)),         # 1.5 -> 2
    ((1025, 1024, 1024), (1024, 1023, 0, 1)),
    ((999, 1001, 1024), (1022, 1024, 1, 0)),
    ((7, 3, 1024), (1024, 439, 0, 293)),
    ((451, 300, 64), (64, 43, 0, 11)),
    ((90, 60, 64), (64, 43, 0, 11)),
    ((100, 51, 64), (64, 33, 0, 16)),
    ((100, 99, 64), (64, 63, 0, 1)),
    ((100, 52, 65), (65, 34, 0, 15)),             # odd target: 65 // 2 - 34 // 2, not ceil(31 / 2) = 16
    ((100, 99, 65), (65, 64, 0, 0)),
    ((130, 40, 65), (65, 20, 0, 22)),
]


@pytest.mark.parametrize("size, expected", IMAGEMAGICK)
def test_fit_inside_matches_mogrify(size, expected):
    placement = fit_inside(*size)
    assert (placement.width, placement.height, placement.left, placement.top) == expected


def _png(path: Path, image: Image.Image, **args) -> Path:
    image.save(path, **args)
    return path


def test_landscape_photo_is_fit_and_padded_white(tmp_path, photo):
    source = photo(tmp_path / "wide.png", 1, size=(90, 60))  # chelsea, 3:2
    image, original, placement = prepare_image(source, 64)
    pixels = np.asarray(image)
    assert image.size == (64, 64) and image.mode == "RGB" and original == (90, 60)
    assert (placement.width, placement.height, placement.left, placement.top) == (64, 43, 0, 11)
    assert (pixels[:11] == 255).all() and (pixels[54:] == 255).all()  # padding above and below (ImageMagick's offset)
    assert not (pixels[11:54] == 255).all()  # the photo itself


def test_exif_orientation_is_applied_before_fitting(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top, blue below
    source = _png(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=95)
    image, original, placement = prepare_image(source, 64)
    assert original == (20, 40)
    assert (placement.width, placement.height, placement.left, placement.top) == (32, 64, 16, 0)
    red, blue, pad = image.getpixel((32, 8)), image.getpixel((32, 56)), image.getpixel((4, 32))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60 and pad == WHITE


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path, photo):
    source = photo(tmp_path / "big.jpg", 0, size=(1024, 768), quality=95)
    fast, _, _ = prepare_image(source, 64)
    full = Image.open(source).convert("RGB").resize((64, 48), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(fast, dtype=int)[8:56] - np.asarray(full, dtype=int))
    assert diff.mean() < 3


def _modes(tmp_path: Path) -> dict[str, Path]:
    rgba = Image.new("RGBA", (48, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 24, 32))  # left half transparent
    grey16 = np.full((32, 48), 128 * 257, dtype=np.uint16)
    rgb16 = np.zeros((32, 48, 3), dtype=np.uint16)
    rgb16[..., 1] = 65535
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent_p = palette.copy()
    transparent_p.info["transparency"] = palette.getpixel((0, 0))
    files = {
        "1": _png(tmp_path / "bw.png", Image.new("1", (48, 32), 1)),
        "L": _png(tmp_path / "grey.png", Image.new("L", (48, 32), 100)),
        "LA": _png(tmp_path / "la.png", Image.merge("LA", (Image.new("L", (48, 32), 0), rgba.getchannel("A")))),
        "P": _png(tmp_path / "palette.png", palette),
        "P+transparency": _png(tmp_path / "palette-t.png", transparent_p, transparency=palette.getpixel((0, 0))),
        "RGBA": _png(tmp_path / "rgba.png", rgba),
        "CMYK": _png(tmp_path / "cmyk.jpg", Image.new("CMYK", (48, 32), (0, 255, 255, 0)), quality=95),
        "CMYK-tiff": _png(tmp_path / "cmyk.tif", Image.new("CMYK", (48, 32), (0, 255, 255, 0))),
        "I;16": _png(tmp_path / "grey16.png", Image.fromarray(grey16)),
        "F": _png(tmp_path / "float.tif", Image.fromarray(np.full((32, 48), 0.5, dtype=np.float32))),
        "YCbCr": _png(tmp_path / "ycbcr.jpg", Image.new("RGB", (48, 32), (0, 0, 255)).convert("YCbCr")),
    }
    files["RGB 16-bit"] = _png16(tmp_path / "rgb16.png", rgb16)
    return files


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_every_colour_mode_becomes_rgb(tmp_path):
    results = {name: prepare_image(path, 64)[0] for name, path in _modes(tmp_path).items()}
    assert all(image.mode == "RGB" and image.size == (64, 64) for image in results.values())
    centre = {name: image.getpixel((48, 32)) for name, image in results.items()}  # right half of the photo
    assert centre["1"] == WHITE and centre["L"] == (100, 100, 100)
    assert centre["I;16"] == (128, 128, 128)  # 16-bit scaled down, not clipped to white
    assert centre["F"] == (128, 128, 128)
    assert centre["RGB 16-bit"] == (0, 255, 0)
    assert centre["RGBA"] == (255, 0, 0) and results["RGBA"].getpixel((12, 32)) == WHITE  # alpha on white
    assert results["LA"].getpixel((12, 32)) == WHITE and centre["LA"] == (0, 0, 0)
    assert results["P+transparency"].getpixel((12, 32)) == WHITE
    for name in ("CMYK", "CMYK-tiff"):
        red, green, blue = centre[name]
        assert red > 200 and green < 60 and blue < 60, name
    assert centre["YCbCr"][2] > 200


def test_to_rgb_composites_on_the_chosen_background():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear, (10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resize(folder: Path, ws: Workspace, settings: ResizeSettings | None = None):
    index = ws.hashes()
    scan, report = scan_stage([Concept(name="c", path=folder, caption=CaptionSource(source="filename"))], 1, ws, index)
    assert not report.errors, report.markdown()
    return resize_stage(scan, settings or ResizeSettings(resolution=64), ws, index)


def test_stage_leaves_originals_untouched_and_copies_ready_images(tmp_path, photo):
    folder = tmp_path / "photos"
    photo(folder / "ready.png", 0, size=(64, 64))
    photo(folder / "ready-jpeg.jpg", 1, size=(64, 64), quality=90)
    photo(folder / "big.jpg", 2, size=(300, 200), quality=90)
    Image.new("L", (300, 200), 255).save(folder / "big-masklabel.png")
    before = _tree(folder)
    ws = Workspace(tmp_path / "ws")
    result = _resize(folder, ws)
    assert _tree(folder) == before  # byte-identical, nothing added
    rows = {row["stem"]: row for row in load_rows(result, ws)}
    assert Path(rows["ready"]["prepared"]).read_bytes() == (folder / "ready.png").read_bytes()
    assert Path(rows["ready-jpeg"]["prepared"]).suffix == ".jpg"  # copied, not re-encoded
    assert Path(rows["ready-jpeg"]["prepared"]).read_bytes() == (folder / "ready-jpeg.jpg").read_bytes()
    big = rows["big"]
    assert Image.open(big["prepared"]).size == (64, 64) and big["prepared"].endswith(".png")
    assert (big["original_width"], big["original_height"], big["offset_left"], big["offset_top"]) == (300, 200, 0, 11)
    user_mask = np.asarray(Image.open(big["user_mask"]))  # fit and padded like its image, black outside
    assert user_mask.shape == (64, 64) and (user_mask[:11] == 0).all() and (user_mask[11:54] == 255).all()
    assert all(str(ws.root) in row["prepared"] for row in rows.values())


def test_rerun_reuses_unchanged_images_and_redoes_a_changed_one(tmp_path, photo):
    folder = tmp_path / "photos"
    for i in range(3):
        photo(folder / f"{i}.png", i, size=(80, 60))
    ws = Workspace(tmp_path / "ws")
    first = _resize(folder, ws)
    assert (first.processed, first.reused) == (3, 0)
    photo(folder / "1.png", 4, size=(80, 60))
    second = _resize(folder, ws)
    assert (second.processed, second.reused) == (1, 2)
    third = _resize(folder, ws, ResizeSettings(resolution=64, min_side=1000))  # min_side only warns
    assert (third.processed, third.reused) == (0, 3)
    Path(load_rows(third, ws)[0]["prepared"]).unlink()  # a deleted output is redone
    assert _resize(folder, ws).processed == 1


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_prepared_images_are_lossless(tmp_path, photo, image_format):
    image, _, _ = prepare_image(photo(tmp_path / "a.jpg", 0, size=(96, 64)), 64)
    decoded = Image.open(io.BytesIO(encode(image, image_format))).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
