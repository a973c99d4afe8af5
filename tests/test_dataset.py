"""Scan + validate: which files are images, and every bad-input kind named before heavy work."""

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from likeness.settings import CaptionSource, Concept
from likeness.stages import load_rows
from likeness.tasks.scan import DatasetError, list_images, scan_stage
from likeness.workspace import Workspace


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_image_files_follow_onetrainer_rules(tmp_path):
    _touch(tmp_path, "b.JPG", "a.png", "c.jpeg", "d.bmp", "e.tif", "f.tiff", "g.webp", "h.avif",
           "a-masklabel.png", "b-condlabel.jpg", "a.txt", "notes.md", ".hidden.png",
           "sub/s.png", ".cache/x.png", "sub/.deeper/y.png")
    flat = [p.name for p in list_images(tmp_path)]
    assert flat == ["a.png", "b.JPG", "c.jpeg", "d.bmp", "e.tif", "f.tiff", "g.webp", "h.avif"]
    deep = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert deep == flat + ["sub/s.png"]  # hidden folders skipped


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bad_dataset(tmp_path, photo):
    person, reg, empty = tmp_path / "person", tmp_path / "reg", tmp_path / "empty"
    photo(person / "good.jpg", 0, size=(64, 64))
    (person / "good.txt").write_text("ohwx man, smiling\n")
    shutil.copy(person / "good.jpg", person / "copy-of-good.jpg")
    (person / "copy-of-good.txt").write_text("ohwx man\n")
    (person / "zero.jpg").write_bytes(b"")
    (person / "notes.jpg").write_text("not an image at all")
    whole = photo(tmp_path / "whole.jpg", 1, size=(128, 96)).read_bytes()
    (person / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    photo(person / "small.png", 2, size=(20, 20))
    (person / "small.txt").write_text("ohwx man\n")
    photo(person / "clash.png", 2, size=(64, 64))
    photo(person / "clash.jpg", 3, size=(64, 64))
    photo(person / "masked.png", 3, size=(64, 64))
    (person / "masked.txt").write_text("ohwx man\n")
    Image.new("L", (50, 40), 255).save(person / "masked-masklabel.png")  # 5:4 for a square photo
    photo(person / "uncaptioned.png", 4, size=(64, 64))
    (person / "broken-link.jpg").symlink_to(tmp_path / "deleted.jpg")
    reg.mkdir()
    shutil.copy(person / "good.jpg", reg / "same-as-person.jpg")
    empty.mkdir()
    concepts = [
        Concept(name="person", path=person),  # per-image captions, missing is an error (the default)
        Concept(name="reg", path=reg, role="regularization", balancing="auto", caption=CaptionSource(source="text", text="man")),
        Concept(name="empty", path=empty, caption=CaptionSource(source="text", text="x")),
        Concept(name="gone", path=tmp_path / "no-such-folder", caption=CaptionSource(source="text", text="x")),
    ]
    return concepts, tmp_path


def test_every_bad_input_is_named_and_nothing_is_written_to_the_photos(bad_dataset):
    concepts, root = bad_dataset
    before = {c.name: _tree(c.path) for c in concepts if c.path.is_dir()}
    links_before = sorted(p.name for p in concepts[0].path.iterdir())
    ws = Workspace(root / "ws")
    result, report = scan_stage(concepts, 32, ws, ws.hashes())
    found = {(i.level, i.kind, Path(i.path).name) for i in report.issues}
    assert found == {
        ("error", "zero-byte", "zero.jpg"),
        ("error", "not-an-image", "notes.jpg"),
        ("error", "unreadable", "broken-link.jpg"),
        ("error", "corrupt", "truncated.jpg"),
        ("error", "name-clash", "clash.png"),
        ("error", "mask-size", "masked-masklabel.png"),
        ("error", "missing-caption", "uncaptioned.png"),
        ("error", "missing-caption", "clash.jpg"),
        ("error", "empty-concept", "empty"),
        ("error", "missing-folder", "no-such-folder"),
        ("warning", "too-small", "small.png"),
        ("warning", "duplicate", "good.jpg"),           # sorted first: copy-of-good.jpg is the original
        ("warning", "duplicate", "same-as-person.jpg"),  # across concepts
    }
    assert {c.name: _tree(c.path) for c in concepts if c.path.is_dir()} == before
    assert sorted(p.name for p in concepts[0].path.iterdir()) == links_before
    with pytest.raises(DatasetError) as raised:
        report.raise_for_errors()
    message = str(raised.value)
    for name, advice in [("zero.jpg", "re-copy or remove"), ("notes.jpg", "remove or convert"),
                         ("truncated.jpg", "re-export or remove"), ("uncaptioned.png", "write one"),
                         ("no-such-folder", "fix concepts path"), ("masked-masklabel.png", "redraw")]:
        assert name in message and advice in message
    assert "small.png" not in message  # warnings are in the report, not in the error
    report_file = (ws.reports / "scan-report.md").read_text()
    assert "small.png" in report_file and "## 10 errors" in report_file
    assert result is None and not ws.table("scan").exists()  # no table for later stages to trust


def test_scan_rows_record_content_and_displayed_size(tmp_path, photo):
    folder = tmp_path / "p"
    stored = photo(folder / "rotated.jpg", 0, size=(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(stored).save(stored, exif=exif.tobytes())
    (folder / "rotated.txt").write_text("a caption\n")
    ws = Workspace(tmp_path / "ws")
    result, report = scan_stage([Concept(name="p", path=folder)], 8, ws, ws.hashes())
    (row,) = load_rows(result, ws)
    assert [i.kind for i in report.issues] == ["few-photos"]  # one photo of the subject
    assert (row["width"], row["height"]) == (40, 60)  # as displayed
    assert row["source_hash"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert row["caption_source"].endswith("rotated.txt") and row["mask_source"] is None
    assert row["id"] == "p/rotated"
