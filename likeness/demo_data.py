"""The demo dataset, written offline from photos that ship with scikit-image.

A "person" concept (the astronaut portrait, Eileen Collins) and a "regularization" concept (the
cameraman) - real photos of people, so CLIPSeg, the captions and the metrics see real content -
each multiplied into varied shots: different crops and zooms, mirror images, small rotations,
light and colour changes and sizes, saved as JPEG like a phone's photos. Deterministic for a
seed; a file already holding the same bytes is left alone so its mtime (and every cache) stays, and
when a marker lists every file with its digest and they all match, nothing is generated at all.

    paths = write_demo_photos(Path("workspace/demo/photos"), seed=42)
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from likeness.files import write_atomic

MARKER = ".likeness-demo.json"  # what was written, for the next call to check instead of generating
DEMO_VERSION = 1  # bump when the variations change: the photos are generated again

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
    wanted = {"version": DEMO_VERSION, "seed": seed, "counts": counts}
    intact = _intact(root, wanted)
    if intact is not None:
        return intact
    written: dict[str, list[Path]] = {}
    for index, (concept, count) in enumerate(counts.items()):
        load, box = SOURCES[concept]
        source = Image.fromarray(load()).convert("RGB")
        rng = np.random.default_rng([seed, index])
        written[concept] = [_write_if_changed(root / concept / f"{concept}-{i:02d}.jpg", variation(source, box, rng))
                            for i in range(count)]
    files = {path.relative_to(root).as_posix(): _digest(path) for paths in written.values() for path in paths}
    write_atomic(root / MARKER, json.dumps({**wanted, "files": files}, indent=1) + "\n")
    return written


def _intact(root: Path, wanted: dict) -> dict[str, list[Path]] | None:
    """The photos the marker lists, when it was written for these settings and every file is unchanged."""
    try:
        marker = json.loads((root / MARKER).read_text())
        files = marker.pop("files")
        if marker != wanted or any(_digest(root / name) != digest for name, digest in files.items()):
            return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    found: dict[str, list[Path]] = {concept: [] for concept in wanted["counts"]}
    for name in files:
        found[name.split("/")[0]].append(root / name)
    return found if all(len(found[c]) == n for c, n in wanted["counts"].items()) else None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_if_changed(path: Path, image: Image.Image) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)
    return path
