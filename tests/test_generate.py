"""Regularization images from the base model (`generate = N`): generated at the training resolution,
cached per image (a re-run loads no model, a larger N adds only the new ones, a smaller one
removes the rest), listed by the scan beside the folder's real photos, and counted by balancing."""

import json

import pytest
from PIL import Image

from likeness.settings import Settings
from likeness.stages import load_rows
from likeness.tasks import generate as generate_module
from likeness.tasks.balance import balance_stage
from likeness.tasks.generate import generate_stage, generated_folder
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def loads(monkeypatch):
    calls = []
    load = generate_module._load_base

    def counting(settings):
        calls.append(settings.model.base_model)
        return load(settings)

    monkeypatch.setattr(generate_module, "_load_base", counting)
    return calls


def with_generate(prepare_settings, count: int, **generation) -> Settings:
    settings = prepare_settings()
    data = settings.model_dump(mode="json")
    data["concepts"][1] |= {"generate": count, "generation": {"steps": 2, "negative_prompt": "blurry", **generation}}
    return Settings.model_validate(data)


def run(settings: Settings):
    ws = Workspace.from_settings(settings)
    return generate_stage(settings, ws, ws.hashes()), ws


def test_generated_images_are_cached_per_image_and_scanned_as_the_concepts_photos(prepare_settings, loads):
    settings = with_generate(prepare_settings, 3)
    result, ws = run(settings)
    folder = generated_folder(ws, "reg")
    assert (result.processed, result.reused) == (3, 0) and len(loads) == 1
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == ["reg-00000.png", "reg-00001.png", "reg-00002.png"]
    assert all(Image.open(p).size == (64, 64) for p in images)  # the training resolution
    assert Image.open(images[0]).tobytes() != Image.open(images[1]).tobytes()  # seeds 0, 1, 2
    first = images[0].read_bytes()

    again, _ = run(settings)
    assert (again.processed, again.reused) == (0, 3) and len(loads) == 1  # nothing missing: no model loaded

    more, _ = run(with_generate(prepare_settings, 4))
    assert (more.processed, more.reused) == (1, 3) and images[0].read_bytes() == first

    fewer, _ = run(with_generate(prepare_settings, 2))
    assert (fewer.processed, fewer.reused) == (0, 2)
    assert sorted(p.name for p in folder.glob("*.png")) == ["reg-00000.png", "reg-00001.png"]

    changed, _ = run(with_generate(prepare_settings, 2, prompt="photo of a man"))
    assert changed.processed == 2  # another prompt: other images

    settings = with_generate(prepare_settings, 2, prompt="photo of a man")
    index = ws.hashes()
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    report.raise_for_errors()
    ids = [row["id"] for row in load_rows(scan, ws)]
    assert {"reg/generated/reg-00000", "reg/generated/reg-00001", "reg/r0"} <= set(ids)
    assert sum(i.startswith("reg/") for i in ids) == 6  # 4 real + 2 generated
    resize = resize_stage(scan, settings.resize, ws, index)
    balance, _ = balance_stage(resize, settings.concepts, settings.training, ws, index,
                               class_prior_images=settings.evaluation.class_prior_images)
    plan = json.loads(balance.table.read_text())
    reg = next(row for row in plan["rows"] if row["name"] == "reg")
    # auto on the images trained: 3 of the 6 class images are held out for the class-prior loss, 3 / 3
    assert (reg["images"], reg["held_out"], reg["trained"], reg["balancing"]) == (6, 3, 3, 1.0)


def test_a_concept_of_generated_images_alone_needs_no_folder(prepare_settings, tmp_path, loads):
    settings = with_generate(prepare_settings, 2)
    data = settings.model_dump(mode="json")
    data["concepts"][1]["path"] = str(tmp_path / "no-such-folder")
    settings = Settings.model_validate(data)
    ws = Workspace.from_settings(settings)
    index = ws.hashes()
    _, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    assert [i.kind for i in report.errors] == ["empty-concept"] and "generate stage" in report.errors[0].message
    run(settings)
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    report.raise_for_errors()
    assert sum(row["concept"] == "reg" for row in load_rows(scan, ws)) == 2


def test_generate_is_only_for_regularization_concepts_with_a_prompt():
    with pytest.raises(ValueError, match="only regularization concepts"):
        Settings.model_validate({"concepts": [{"name": "p", "path": "x", "generate": 3}]})
    with pytest.raises(ValueError, match="class prompt is missing"):
        Settings.model_validate({"concepts": [{"name": "p", "path": "x"},
                                              {"name": "r", "path": "y", "role": "regularization", "generate": 3}]})
