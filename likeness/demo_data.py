"""The demo dataset, written offline from photos that ship with scikit-image.

A "person" concept (the astronaut portrait, Eileen Collins) and a "regularization" concept (the
cameraman) - real photos of people, so CLIPSeg, the captions and the metrics see real content -
each multiplied into varied shots: different crops and zooms, mirror images, small rotations,
light and colour changes and sizes, saved as JPEG like a phone's photos. Deterministic for a
seed; a file already holding the same bytes is left alone so its mtime (and every cache) stays.

    paths = write_demo_photos(Path("workspace/demo/photos"), seed=42)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from likeness.files import write_atomic

# Where the person is in each source photo (left, top, right, bottom), so every crop keeps them.
SOURCES: dict[str, tuple[Callable[[], np.ndarray], tuple[int, int, int, int]]] = {}


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _cameraman() -> np.ndarray:
    from skimage import data

    return data.camera()


SOURCES = {
    "person": (_astronaut, (110, 0, 330, 300)),       # head and shoulders
    "regularization": (_cameraman, (150, 30, 380, 330)),
}


def variation(source: Image.Image, person_box: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    """One varied shot of the source photo that still contains the whole person box."""
    left, top, right, bottom = person_box
    width, height = source.size
    margin = rng.uniform(0.05, 0.6)  # how far the crop reaches beyond the person: zoom
    pad_x, pad_y = (right - left) * margin, (bottom - top) * margin
    box = (max(0, left - pad_x * rng.uniform(0.5, 1.5)), max(0, top - pad_y * rng.uniform(0.2, 1.0)),
           min(width, right + pad_x * rng.uniform(0.5, 1.5)), min(height, bottom + pad_y * rng.uniform(0.5, 1.5)))
    image = source.crop(tuple(round(v) for v in box))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(128, 128, 128))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    scale = rng.uniform(160, 360) / max(image.size)
    return image.resize((max(32, round(image.width * scale)), max(32, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def write_demo_photos(root: Path, seed: int = 42, counts: dict[str, int] | None = None) -> dict[str, list[Path]]:
    """Write `counts[concept]` photos per concept under root/<concept>/; returns their paths."""
    counts = counts or {"person": 8, "regularization": 12}
    written: dict[str, list[Path]] = {}
    for index, (concept, count) in enumerate(counts.items()):
        load, box = SOURCES[concept]
        source = Image.fromarray(load()).convert("RGB")
        rng = np.random.default_rng([seed, index])
        written[concept] = [_write_if_changed(root / concept / f"{concept}-{i:02d}.jpg", variation(source, box, rng))
                            for i in range(count)]
    return written


def _write_if_changed(path: Path, image: Image.Image) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)
    return path
