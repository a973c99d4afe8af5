"""Face identity on real photos (scikit-image's astronaut and cameraman): the same person in
varied shots scores far above another person; no face is reported, never a crash; deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from likeness.models.faces import (
    FaceModelError,
    IdentityScores,
    draw_face_box,
    load_face_models,
    main_face,
    reference_embeddings,
    score_identity,
)


@pytest.fixture(scope="module")
def models():
    return load_face_models()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def references(models, astronaut):
    return reference_embeddings(models, [astronaut, ImageOps.mirror(astronaut).crop((40, 0, 470, 430))])


def variations(image: Image.Image) -> dict[str, Image.Image]:
    return {
        "crop": image.crop((80, 0, 380, 300)),
        "flip": ImageOps.mirror(image),
        "darker": ImageEnhance.Brightness(image).enhance(0.6),
        "brighter": ImageEnhance.Brightness(image).enhance(1.3),
        "rotate +8": image.rotate(8, resample=Image.Resampling.BICUBIC),
        "rotate -8": image.rotate(-8, resample=Image.Resampling.BICUBIC),
        "smaller": image.resize((200, 200), Image.Resampling.LANCZOS),
        "larger": image.resize((800, 800), Image.Resampling.BICUBIC),
        "grey": ImageOps.grayscale(image).convert("RGB"),
        "64 px head": image.crop((110, 0, 330, 300)).resize((47, 64), Image.Resampling.LANCZOS),
    }


def test_the_same_person_scores_far_above_another(models, astronaut, references):
    same = score_identity(models, list(variations(astronaut).values()), references)
    camera = Image.fromarray(data.camera()).convert("RGB")
    other = score_identity(models, [camera, ImageOps.mirror(camera), camera.resize((256, 256))], references)
    assert None not in same.values and None not in other.values  # a face in every shot
    assert min(same.values) > 0.6, dict(zip(variations(astronaut), same.values))
    assert max(other.values) < 0.3, other.values
    assert min(same.values) - max(other.values) > 0.4  # measured: 0.69 (64 px) ..0.96 vs 0.15..0.20
    summary = same.summary()
    assert summary["face_no_face"] == 0.0
    assert summary["face_identity_min"] <= summary["face_identity"] <= summary["face_identity_max"]


def test_an_image_without_a_face_is_reported_not_a_crash(models, references):
    no_faces = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea()), Image.new("RGB", (64, 64), "grey")]
    scores = score_identity(models, no_faces, references)
    assert scores.values == [None, None, None] and scores.boxes == [None, None, None]
    assert scores.summary() == {"face_identity": None, "face_no_face": 1.0, "face_identity_std": None,
                                "face_identity_min": None, "face_identity_max": None}
    assert IdentityScores([0.5, None], [None, None]).summary()["face_no_face"] == 0.5
    assert score_identity(models, [no_faces[0]], np.zeros((0, 128))).values == [None]  # no reference face


def test_the_score_is_deterministic(models, astronaut, references):
    images = list(variations(astronaut).values())[:4]
    first, second = score_identity(models, images, references), score_identity(models, images, references)
    assert first.values == second.values and first.boxes == second.boxes
    again = reference_embeddings(load_face_models(), [astronaut])
    assert np.array_equal(again[0], references[0])


def test_the_face_box_is_in_image_pixels_and_drawn(models, astronaut):
    face = main_face(models, astronaut)
    left, top, right, bottom = face.box
    assert 150 < left < right < 320 and 20 < top < bottom < 220  # Eileen Collins' face in the 512 px portrait
    drawn = draw_face_box(astronaut, face.box, "0.98")
    assert drawn.size == astronaut.size and drawn.getpixel((left, (top + bottom) // 2)) == (0, 220, 0)


def test_a_missing_model_file_names_the_setting(tmp_path):
    with pytest.raises(FaceModelError, match="evaluation.face_detector"):
        load_face_models(tmp_path / "yunet.onnx", tmp_path / "sface.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(FaceModelError, match="cannot load"):
        load_face_models(bad, bad)
