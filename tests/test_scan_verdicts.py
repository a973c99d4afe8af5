"""The scan's verdict for every file (used / skipped and why / warning / error), HEIC photos,
photos above Pillow's decompression-bomb thresholds, and the small-set and unused-caption hints."""

import warnings
from pathlib import Path

import pillow_heif
from PIL import Image

from likeness.settings import CaptionSource, Concept, ResizeSettings
from likeness.stages import load_rows
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace


def _heic(path: Path, size=(60, 40)) -> Path:
    """A real HEIC, written by pillow-heif itself (x265)."""
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))
    pillow_heif.from_pillow(image).save(path, quality=90)
    return path


def _scan(tmp_path, concept):
    ws = Workspace(tmp_path / "ws")
    return scan_stage([concept], 8, ws, ws.hashes()) + (ws,)


def test_every_file_gets_a_verdict(tmp_path, photo):
    folder = tmp_path / "me"
    photo(folder / "a.jpg", 0, size=(64, 64))
    (folder / "a.txt").write_text("ohwx man, smiling\n")
    Image.new("L", (32, 32), 255).save(folder / "a-masklabel.png")
    _heic(folder / "b.heic")
    for name, data in [(".DS_Store", b"\0"), ("Thumbs.db", b"\0"), ("._a.jpg", b"\0"), ("notes.txt", b"hi"),
                       ("doc.pdf", b"%PDF"), ("README", b"x")]:
        (folder / name).write_bytes(data)
    photo(folder / "c-condlabel.png", 1, size=(16, 16))
    Image.new("L", (8, 8)).save(folder / "orphan-masklabel.png")
    photo(folder / "anim.gif", 2, size=(16, 16))
    photo(folder / "sub" / "deep.jpg", 3, size=(16, 16))
    (folder / ".thumbnails").mkdir()
    concept = Concept(name="me", path=folder, caption=CaptionSource(source="text", text="ohwx man"))
    result, report, ws = _scan(tmp_path, concept)
    verdicts = {v.path: (v.verdict, v.why) for v in report.files}
    assert set(verdicts) == {p.relative_to(folder).as_posix() + ("/" if p.is_dir() else "") for p in folder.iterdir()}
    assert verdicts["a.jpg"] == ("used", "photo, 64x64 JPEG")
    assert verdicts["b.heic"] == ("used", "photo, 60x40 HEIF")
    assert verdicts["a-masklabel.png"] == ("used", "your mask of a.jpg")  # 32x32 for 64x64: scaled with it
    assert verdicts["a.txt"] == ("skipped", "caption of a.jpg, unused: caption.source is 'text'")
    for name in (".DS_Store", "Thumbs.db"):
        assert verdicts[name] == ("skipped", "hidden or system file")
    assert verdicts["._a.jpg"] == ("skipped", "AppleDouble metadata file (macOS)")
    assert verdicts["c-condlabel.png"][0] == "skipped" and "conditioning label" in verdicts["c-condlabel.png"][1]
    assert verdicts["orphan-masklabel.png"] == ("skipped", "a mask without a photo of that name")
    assert verdicts["notes.txt"] == ("skipped", "a text file without a photo of that name")
    assert verdicts["doc.pdf"][0] == verdicts["README"][0] == "skipped" and "(.pdf)" in verdicts["doc.pdf"][1]
    assert verdicts["anim.gif"] == ("warning", "skipped: GIF (256 colours, maybe animated) is not read: "
                                               "convert it to PNG or JPEG to train on it")
    assert verdicts["sub/"][0] == "skipped" and "include_subdirectories" in verdicts["sub/"][1]
    assert verdicts[".thumbnails/"] == ("skipped", "hidden folder: not read")
    kinds = sorted(i.kind for i in report.warnings)
    assert kinds == ["few-photos", "not-read", "unused-captions"] and not report.errors  # each noted once
    unused = next(i for i in report.warnings if i.kind == "unused-captions")
    assert "1 caption file(s)" in unused.message and "caption.source = 'per_image'" in unused.message
    assert "only 2 photo(s) of the subject" in next(i.message for i in report.warnings if i.kind == "few-photos")
    text = (ws.reports / "scan-report.md").read_text()
    assert "## Every file" in text and "| `Thumbs.db` | skipped | hidden or system file |" in text
    assert "| me | 2 | 3 | 11 | 1 | 0 |" in text  # images; files used, skipped, warning, error
    assert [row["stem"] for row in load_rows(result, ws)] == ["a", "b"]


def test_heic_photos_are_read_and_resized(tmp_path):
    folder = tmp_path / "me"
    folder.mkdir()
    _heic(folder / "phone.heic", size=(90, 60))
    concept = Concept(name="me", path=folder, caption=CaptionSource(source="text", text="ohwx man"))
    result, report, ws = _scan(tmp_path, concept)
    (row,) = load_rows(result, ws)
    assert (row["format"], row["width"], row["height"]) == ("HEIF", 90, 60)
    resized = resize_stage(result, ResizeSettings(resolution=64), ws, ws.hashes())
    (out,) = load_rows(resized, ws)
    prepared = Image.open(out["prepared"]).convert("RGB")
    assert prepared.size == (64, 64) and (out["offset_top"], out["scaled_height"]) == (11, 43)
    assert prepared.getpixel((5, 32))[2] > 150 and prepared.getpixel((58, 32))[0] > 150  # blue left, red right
    assert prepared.getpixel((32, 2)) == (255, 255, 255)  # padded white


def test_photos_beyond_pillows_bomb_thresholds_are_named(tmp_path, photo, monkeypatch):
    folder = tmp_path / "me"
    photo(folder / "large.png", 0, size=(40, 30))  # 1200 pixels
    photo(folder / "huge.png", 1, size=(50, 50))  # 2500 pixels
    photo(folder / "fine.png", 2, size=(30, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning above 1000 pixels, error above 2000
    concept = Concept(name="me", path=folder, caption=CaptionSource(source="text", text="ohwx man"))
    with warnings.catch_warnings(record=True) as seen:
        result, report, _ = _scan(tmp_path, concept)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]  # the report names them
    (error,) = report.errors
    assert (error.kind, Path(error.path).name) == ("too-large", "huge.png")
    assert error.message.startswith("0.0025 megapixels, above Pillow's decompression-bomb limit of 0.002 megapixels")
    large = next(i for i in report.warnings if i.kind == "very-large")
    assert Path(large.path).name == "large.png" and large.message.startswith("0.0012 megapixels, above Pillow's")
    assert {v.path: v.verdict for v in report.files} == {"fine.png": "used", "large.png": "warning", "huge.png": "error"}
