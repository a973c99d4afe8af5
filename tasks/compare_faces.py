"""Compare faces: score any images against the person's photos, by face identity.

For images from anywhere (our checkpoints, A1111 or ComfyUI outputs): each image's main face is
embedded and compared with every face found in the reference photos (`likeness/models/faces.py`).
Writes a table (`faces.csv`: image, identity, face box, confidence; empty identity: no face) and
a contact sheet (`faces.jpg`: each image with its face box and score) into the output folder.

    likeness compare-faces --reference photos/person out/*.png --output workspace/faces
    result = compare_faces(Path("photos/person"), [Path("a.png")], Path("workspace/faces"))

The task `compare_faces_task` publishes the table and the sheet as Prefect artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import base64

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.files import atomic_path, write_atomic
from likeness.models.faces import draw_face_box, identity, load_face_models, main_face, reference_embeddings
from likeness.stages import PrepareError
from likeness.tasks.evaluate.image_grid import thumbnail
from likeness.tasks.scan import list_images

SHEET_CELL = 256  # contact-sheet thumbnails fit in this square
SHEET_COLUMNS = 6


class CompareFacesError(PrepareError):
    """Unusable inputs: no reference photos, no face in them, an unreadable image."""


@dataclass(frozen=True)
class FaceComparison:
    rows: list[dict]
    references: int  # reference photos with a face
    table: Path
    sheet: Path

    def summary(self) -> str:
        found = [r["identity"] for r in self.rows if r["identity"] is not None]
        mean = f"mean identity {sum(found) / len(found):.3f}" if found else "no face found"
        return (f"compare-faces: {len(self.rows)} image(s) against {self.references} reference face(s); "
                f"{len(found)} with a face, {mean}; {self.table}, {self.sheet}")


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CompareFacesError(f"{path}: not an image Pillow can read ({error}); remove it from the list") from None


def compare_faces(reference: Path, images: Sequence[Path], output: Path, detector: str | None = None,
                  recognizer: str | None = None, score_threshold: float = 0.7) -> FaceComparison:
    """Identity of each image against the faces in the `reference` folder; writes the table and the sheet."""
    reference = Path(reference)
    if not reference.is_dir():
        raise CompareFacesError(f"{reference}: not a folder; --reference takes the folder of the person's photos")
    photos = list_images(reference)
    if not photos:
        raise CompareFacesError(f"{reference}: no images in this folder; point --reference at the person's photos")
    images = expand(images)
    if not images:
        raise CompareFacesError("no images to compare: pass image files (or folders of images) after the options")
    models = load_face_models(detector, recognizer, score_threshold)
    references = reference_embeddings(models, [open_image(p) for p in photos])
    if len(references) == 0:
        raise CompareFacesError(f"{reference}: no face found in any of its {len(photos)} photos; use photos "
                                "where the person's face is visible")
    rows, cells = [], []
    for path in images:
        image = open_image(path)
        face = main_face(models, image)
        score = identity(face, references)
        rows.append({"image": str(path), "identity": score, "face": face is not None,
                     "box": None if face is None else list(face.box),
                     "confidence": None if face is None else face.confidence})
        label = "no face" if score is None else f"{score:.3f}"
        cells.append(sheet_cell(image, None if face is None else face.box, f"{label} {path.name}"))
    return FaceComparison(rows, len(references), write_table(rows, output / "faces.csv"),
                          write_sheet(cells, output / "faces.jpg"))


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders become their images (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += list_images(path)
        elif path.exists():
            found.append(path)
        else:
            raise CompareFacesError(f"{path}: no such file")
    return found


def write_table(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows, columns=["image", "identity", "face", "box", "confidence"])
    return write_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def sheet_cell(image: Image.Image, box: tuple[int, int, int, int] | None, label: str) -> Image.Image:
    """A thumbnail of the image with its face box (scaled) and label drawn."""
    thumb = thumbnail(image, SHEET_CELL)
    scale = thumb.width / image.width
    return draw_face_box(thumb, None if box is None else tuple(round(v * scale) for v in box), label)


def write_sheet(thumbs: list[Image.Image], path: Path) -> Path:
    """The thumbnails in rows of SHEET_COLUMNS."""
    sheet = Image.new("RGB", (SHEET_CELL * min(len(thumbs), SHEET_COLUMNS),
                              SHEET_CELL * -(-len(thumbs) // SHEET_COLUMNS)), "white")
    for i, thumb in enumerate(thumbs):
        sheet.paste(thumb, ((i % SHEET_COLUMNS) * SHEET_CELL, (i // SHEET_COLUMNS) * SHEET_CELL))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=90)
    return path


# --- Prefect task ----------------------------------------------------------------------------


@task(name="compare-faces")
def compare_faces_task(reference: Path, images: list[Path], output: Path, detector: str | None = None,
                       recognizer: str | None = None, score_threshold: float = 0.7) -> FaceComparison:
    """Face identity of each image against the reference photos; artifacts `faces` (sheet) and `faces-table`."""
    result = compare_faces(reference, images, output, detector, recognizer, score_threshold)
    create_table_artifact([{k: v for k, v in row.items() if k != "box"} for row in result.rows], key="faces-table",
                          description=f"Face identity per image against {reference}")
    inline = base64.b64encode(result.sheet.read_bytes()).decode("ascii")
    create_markdown_artifact(f"# Faces\n\n{result.summary()}\n\n![faces](data:image/jpeg;base64,{inline})\n",
                             key="faces", description="Detected faces and their identity")
    get_run_logger().info(result.summary())
    return result
