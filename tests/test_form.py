"""The UI's run form (issue 15): every setting explained, the form opens on the profile, one rule for
profile vs form vs overrides, a strict parameter schema; and what the UI shows of a run: the texts
that name the profile and the override, the mask contact sheet, the per-file scan verdicts, table
cells as text. Fast: no server (the API tests are in test_deployments.py, the browser in test_server_ui.py)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.utilities.schema_tools import validate

from likeness.deployments import entry
from likeness.deployments.catalog import runner_deployments
from likeness.deployments.form import apply_changes, changed_fields, profile_choices
from likeness.profiles import SettingsError, available_profiles, load_profile
from likeness.settings import Settings
from likeness.stages import MissingStageError, run_profile


def _undescribed(schema: dict) -> list[str]:
    """Every property of every model in the JSON schema that has no description."""
    missing = []
    for model, definition in {"Settings": schema, **schema.get("$defs", {})}.items():
        for name, prop in definition.get("properties", {}).items():
            if not str(prop.get("description", "")).strip():
                missing.append(f"{model}.{name}")
    return missing


def test_every_setting_has_a_description():
    missing = _undescribed(Settings.model_json_schema())
    assert not missing, f"{len(missing)} settings without a description (Field(description=...)): {missing}"


def test_the_walk_finds_a_field_without_a_description():
    schema = {"properties": {"a": {"description": "x"}}, "$defs": {"Sub": {"properties": {"b": {"type": "integer"}}}}}
    assert _undescribed(schema) == ["Sub.b"]


# --- the form opens on the profile, strictly -------------------------------------------------


@pytest.fixture(scope="module")
def served():
    settings = load_profile("demo-cpu", ["training.epochs=1"])
    return settings, {d.name: d for d in runner_deployments(settings, "demo-cpu", ["training.epochs=1"])}


def test_the_form_opens_on_the_served_profile(served):
    settings, built = served
    defaults = built["pipeline"].parameters
    assert defaults["profile"] == "demo-cpu" and defaults["overrides"] == []
    assert defaults["settings"] == settings.model_dump(mode="json")
    assert defaults["settings"]["resize"]["resolution"] == 64 and defaults["settings"]["training"]["epochs"] == 1
    assert [c["path"] for c in defaults["settings"]["concepts"]] == ["workspace/demo/photos/person",
                                                                     "workspace/demo/photos/regularization"]
    assert defaults["settings"]["concepts"][0]["caption"]["text"] == "ohwx person"


def test_the_served_schema_is_strict_with_a_profile_dropdown(served):
    _, built = served
    schema = built["pipeline"]._parameter_openapi_schema.model_dump(exclude_unset=True)
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["definitions"].values() if "properties" in d)
    profile = schema["properties"]["profile"]
    assert profile["enum"] == available_profiles() and "Choose another profile" in profile["description"]
    assert "None" in schema["properties"]["settings"]["description"]
    stage = built["stage-masks"]._parameter_openapi_schema.model_dump(exclude_unset=True)
    assert stage["additionalProperties"] is False and "stage" in stage["properties"]


def test_the_forms_defaults_pass_the_schema_the_server_checks(served):
    _, built = served
    for deployment in built.values():
        schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
        validate(deployment.parameters, schema, raise_on_error=True, ignore_required=True)


@pytest.mark.parametrize("bad", [{"nope": 1}, {"settings": {"training": {"epochs": "three"}}},
                                 {"settings": {"training": {"epoch": 3}}}, {"settings": {"concepts": [{"nme": "x"}]}},
                                 {"profile": "no-such-profile"}, {"overrides": "training.epochs=3"}])
def test_the_schema_refuses_unknown_and_ill_typed_parameters_at_every_level(served, bad):
    from prefect.utilities.schema_tools import ValidationError

    _, built = served
    schema = built["pipeline"]._parameter_openapi_schema.model_dump(exclude_unset=True)
    with pytest.raises(ValidationError):
        validate({**built["pipeline"].parameters, **bad}, schema, raise_on_error=True, ignore_required=True)


def test_a_served_toml_path_joins_the_dropdown(tmp_path):
    path = str(tmp_path / "mine.toml")
    assert profile_choices(path) == [*available_profiles(), path]
    assert profile_choices("demo-cpu") == available_profiles()


# --- the rule: profile vs form vs overrides --------------------------------------------------


def _opened(profile="demo-cpu", overrides=()):
    return {"profile": profile, "settings": load_profile(profile, overrides).model_dump(mode="json"), "overrides": []}


def test_the_form_as_submitted_is_the_run(tmp_path):
    opened = _opened()
    form = {**opened["settings"], "training": {**opened["settings"]["training"], "epochs": 3}}
    resolved = entry.resolve_settings("demo-cpu", form, [], opened)
    assert resolved.model_dump(mode="json") == {**opened["settings"], "training": {**form["training"]}}
    assert "changed: training.epochs=3" in entry.settings_source("demo-cpu", form, opened)
    assert entry.settings_source("demo-cpu", opened["settings"], opened).endswith("changed: nothing")


def test_another_profile_takes_the_forms_changes_only():
    opened = _opened()
    form = {**opened["settings"], "training": {**opened["settings"]["training"], "epochs": 3}}
    resolved = entry.resolve_settings("sdxl-person", form, ["saving.every=5"], opened)
    reference = load_profile("sdxl-person")
    assert resolved.training.epochs == 3 and resolved.saving.every == 5  # the change, the override on top
    assert resolved.resize.resolution == reference.resize.resolution != 64  # untouched: the new profile's
    assert resolved.model.base_model == reference.model.base_model
    assert "profile 'sdxl-person' with the changes made in the settings form: training.epochs=3" in \
        entry.settings_source("sdxl-person", form, opened)


def test_no_form_is_the_profile_alone():
    assert entry.resolve_settings("sdxl-person", None, ["training.epochs=2"], _opened()).training.epochs == 2
    assert entry.settings_source("sdxl-person", None, _opened()) == "profile 'sdxl-person'"


def test_a_triggered_run_names_the_watchers_event():
    assert "likeness.dataset.changed event of the dataset watcher" in \
        entry.settings_source("demo-cpu", _opened()["settings"], _opened(), triggered="retrain when the dataset changed")
    assert entry.settings_source("demo-cpu", _opened()["settings"], _opened(), triggered="resume a crashed train") == \
        "the automation 'resume a crashed train' (the parameters it passed)"


def test_changed_fields_and_apply_changes():
    opened = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    submitted = {"a": {"b": 2, "c": [1, 2, 3]}, "d": "x", "e": None}
    changes = changed_fields(opened, submitted)
    assert changes == {"a.b": 2, "a.c": [1, 2, 3], "e": None}
    assert apply_changes({"d": "y"}, changes) == {"d": "y", "a": {"b": 2, "c": [1, 2, 3]}, "e": None}


# --- texts -----------------------------------------------------------------------------------


def test_a_bad_override_is_named_as_the_source():
    with pytest.raises(SettingsError) as caught:
        load_profile("demo-cpu", ["training.epochs=0"])
    message = str(caught.value)
    assert message.startswith("invalid settings in the override 'training.epochs=0'")
    assert "training.epochs: must be >= 1 (got 0) (set by the override 'training.epochs=0')" in message
    with pytest.raises(SettingsError, match=r"in the override 'training\.epochs=0' \(on the settings form\):\n  training\.epochs: must be >= 1"):
        entry.resolve_settings("demo-cpu", _opened()["settings"], ["training.epochs=0"], _opened())


def test_a_bad_profile_value_still_names_the_profile(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nepochs = 0\n")
    with pytest.raises(SettingsError, match=f"invalid settings in {bad}:\n  training.epochs: must be >= 1 \\(got 0\\)$"):
        load_profile(bad, ["saving.every=3"])


def test_missing_stage_hint_names_the_runs_profile():
    assert "--profile <profile>" in str(MissingStageError("resize", "scan", Path("ws/scan.json")))
    with run_profile("demo-cpu"):
        message = str(MissingStageError("resize", "scan", Path("ws/scan.json")))
    assert "run `likeness stage scan --profile demo-cpu` (or `likeness prepare --profile demo-cpu`)" in message


def test_lone_dashes_in_table_cells_are_escaped():
    from likeness.tasks.evaluate.select import as_text

    assert as_text([{"epoch": "-", "dino": "-0.5", "n": 3}]) == [{"epoch": "\\-", "dino": "-0.5", "n": 3}]


# --- what the UI shows of the prepare stages -------------------------------------------------


def test_mask_sheet_tints_masks_and_frames_flagged_ones(tmp_path):
    from likeness.tasks.masks import SHEET_FLAG, mask_sheet

    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    items = [("person/a", tmp_path / "image.png", tmp_path / "mask.png", False),
             ("person/b", tmp_path / "image.png", tmp_path / "mask.png", True)]
    import io

    sheet = np.asarray(Image.open(io.BytesIO(mask_sheet(items, thumb=64))).convert("RGB")).astype(int)
    inside, outside = sheet[4 + 32, 4 + 32], sheet[4 + 4, 4 + 4]  # first tile: centre (masked), corner (not)
    assert inside[2] - inside[0] > 60 and abs(int(outside[2]) - int(outside[0])) < 15  # tinted cyan where masked
    frame = sheet[4 + 32, 4 + 68 + 1]  # second tile's left edge
    assert frame[0] > 180 and frame[1] < 90, f"no red frame on the flagged tile: {frame} vs {SHEET_FLAG}"
    left_edge = sheet[4 + 32, 4 + 1]
    assert left_edge[0] < 180  # the unflagged tile has none


def test_scan_verdicts_one_row_per_file(tmp_path, photo):
    from likeness.settings import Concept
    from likeness.tasks.scan import scan_stage, verdict_rows
    from likeness.workspace import Workspace

    photo(tmp_path / "person" / "big.jpg", 0)
    photo(tmp_path / "person" / "small.jpg", 1, size=(40, 30))
    concepts = [Concept(name="person", path=tmp_path / "person", caption={"source": "text", "text": "ohwx man"})]
    ws = Workspace(tmp_path / "ws")
    result, report = scan_stage(concepts, 64, ws, ws.hashes(), workers=1)
    rows = {row["file"]: row for row in verdict_rows(result, report, ws)}
    assert set(rows) == {"big.jpg", "small.jpg", "person"}  # "person": the concept folder's own hint
    assert "fewer than 5" in rows["person"]["verdict"] or "photos" in rows["person"]["verdict"], rows["person"]
    assert rows["big.jpg"]["verdict"] == "ok" and rows["big.jpg"]["concept"] == "person"
    assert rows["small.jpg"]["verdict"].startswith("warning") and rows["small.jpg"]["size"] == "40x30"


def test_serve_knows_when_the_demo_files_are_missing(tmp_path, monkeypatch):
    from likeness.demo import missing_demo_files

    monkeypatch.chdir(tmp_path)
    settings = load_profile("demo-cpu")
    assert len(missing_demo_files(settings)) == 6  # four model folders, two photo folders
    assert missing_demo_files(load_profile("sdxl-person")) == []  # not a demo: nothing to write


def test_summary_page_links_stage_runs_and_the_latest_artifacts(tmp_path):
    from likeness.deployments.summary import summary_markdown

    Image.new("RGB", (2048, 512), "white").save(tmp_path / "overview.jpg")
    page = summary_markdown(tmp_path / "out" / "demo-4.safetensors", tmp_path / "save" / "demo-4.safetensors",
                            "it has the highest likeness.", tmp_path / "overview.jpg",
                            [("prepare", "run-1", []), ("evaluate", "run-2", [("grid", "art-1")])])
    assert "**Chosen checkpoint:** `" in page and "demo-4.safetensors" in page and "it has the highest likeness." in page
    assert "![overview grid](data:image/jpeg;base64," in page
    assert "- [prepare](/runs/flow-run/run-1?tab=Artifacts): no new artifacts (cached)" in page
    assert "[grid](/artifacts/artifact/art-1)" in page and "[mask-overlays](/artifacts/key/mask-overlays)" in page
