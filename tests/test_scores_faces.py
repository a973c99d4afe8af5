"""The scores stage's face identity on real photos: the training photos' faces are the reference
(the prepared workspace's subject photos: astronaut, cat, coffee: one face); a column of the
person's shots scores high, a column of another person low, a column without faces reports the
share; records are reused on a re-run."""

import pytest
from PIL import Image, ImageOps
from skimage import data

from likeness.stages import Counts
from likeness.tasks.evaluate.grid import EvaluationError, read_eval_table, write_eval_table
from likeness.tasks.evaluate.scores import scores_stage
from likeness.workspace import Workspace


def grid_table(ws: Workspace, columns: dict[str, list[Image.Image]]):
    """A grid stage table as `grid_stage` writes it, with the given images as each column's."""
    index, rows, candidates = ws.hashes(), [], []
    for number, (name, images) in enumerate(columns.items()):
        epoch = None if name == "base" else number
        candidates.append({"name": name, "path": name, "epoch": epoch, "step": number, "key": name})
        for seed, image in enumerate(images):
            path = ws.root / "evaluation" / "images" / f"{name}-{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            rows.append({"checkpoint": name, "prompt_index": 0, "prompt": "photo of ohwx man", "seed": seed,
                         "image": str(path), "image_hash": index.digest(path)})
    return write_eval_table(ws, "grid", rows, Counts(), {}, {"candidates": candidates,
                                                             "losses": {c: {} for c in columns}})


@pytest.fixture
def workspace(train_settings):
    settings = train_settings()
    settings.evaluation.metrics = ["face_identity"]
    return settings, Workspace.from_settings(settings)


def test_face_identity_per_checkpoint(workspace, monkeypatch):
    settings, ws = workspace
    astronaut, camera = Image.fromarray(data.astronaut()), Image.fromarray(data.camera()).convert("RGB")
    grid = grid_table(ws, {
        "base": [camera, Image.fromarray(data.coffee())],
        "person-1.safetensors": [ImageOps.mirror(astronaut), astronaut.crop((60, 0, 420, 360)).resize((128, 128))],
        "person-2.safetensors": [Image.fromarray(data.coffee()), Image.fromarray(data.rocket()),
                                 astronaut.rotate(6), Image.new("RGB", (64, 64))],
    })
    result = scores_stage(grid, settings, ws, ws.hashes())
    base, person, mostly_none = read_eval_table(result, ws)["rows"]
    assert base["base"] and base["face_identity"] < 0.3 and base["face_no_face"] == 0.5
    assert person["face_identity"] > 0.8 and person["face_no_face"] == 0.0
    assert person["face_identity_min"] <= person["face_identity"] <= person["face_identity_max"]
    assert person["face_identity_std"] >= 0
    assert mostly_none["face_no_face"] == 0.75 and mostly_none["face_identity"] > 0.8
    assert person["dino"] is None and person["clip_t"] is None  # not enabled
    assert "face_identity" in (ws.root / "evaluation" / "scores.csv").read_text().splitlines()[0]
    again = scores_stage(grid, settings, ws, ws.hashes())
    assert (again.processed, again.reused) == (0, 3)
    assert read_eval_table(again, ws)["rows"] == read_eval_table(result, ws)["rows"]

    # training photos with no face at all: a clear error, not a crash (a new threshold: new records)
    from likeness.tasks.evaluate import scores

    settings.evaluation.face_score_threshold = 0.71
    monkeypatch.setattr(scores, "open_photo", lambda path: Image.fromarray(data.coffee()))
    with pytest.raises(EvaluationError, match="no face found in any of the 3 subject photos"):
        scores_stage(grid, settings, ws, ws.hashes())
