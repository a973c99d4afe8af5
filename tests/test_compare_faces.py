"""`likeness compare-faces`: identity per image against a folder of the person's photos, a table and
a contact sheet with the face boxes; bad input is one clear error (exit 2), no traceback."""

from pathlib import Path

from PIL import Image, ImageOps
from skimage import data
from typer.testing import CliRunner

from likeness.cli import app


def write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_compare_faces_prints_a_table_and_writes_the_sheet(tmp_path):
    astronaut = Image.fromarray(data.astronaut())
    write(tmp_path / "ref" / "a.jpg", astronaut)
    write(tmp_path / "ref" / "b.png", ImageOps.mirror(astronaut).resize((300, 300)))
    same = write(tmp_path / "gen" / "same.png", astronaut.rotate(5).resize((256, 256)))
    other = write(tmp_path / "gen" / "other.png", Image.fromarray(data.camera()).resize((256, 256)))
    none = write(tmp_path / "gen" / "none.jpg", Image.fromarray(data.coffee()))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare-faces", "--reference", str(tmp_path / "ref"), "--output", str(out),
                                      str(same), str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    lines = {Path(line.split()[0]).name: line for line in result.output.splitlines()[1:4]}
    assert float(lines["same.png"].split()[1]) > 0.8
    assert float(lines["other.png"].split()[1]) < 0.3
    assert "no face" in lines["none.jpg"]
    assert "4 image(s) against 2 reference face(s); 3 with a face" in result.output
    table = (out / "faces.csv").read_text().splitlines()
    assert table[0] == "image,identity,face,box,confidence" and len(table) == 5
    sheet = Image.open(out / "faces.jpg")
    assert sheet.size == (4 * 256, 256)
    assert (str(other) in (out / "faces.csv").read_text()) and (str(none) in (out / "faces.csv").read_text())


def test_bad_input_is_one_clear_error(tmp_path):
    runner = CliRunner()
    write(tmp_path / "ref" / "coffee.png", Image.fromarray(data.coffee()))
    image = write(tmp_path / "x.png", Image.new("RGB", (32, 32)))
    cases = [
        ([str(tmp_path / "missing"), str(image)], "not a folder"),
        ([str(tmp_path / "ref"), str(image)], "no face found in any of its 1 photos"),
        ([str(tmp_path / "ref"), str(tmp_path / "nope.png")], "no such file"),
    ]
    for (reference, *images), message in cases:
        result = runner.invoke(app, ["compare-faces", "--reference", reference, *images])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
