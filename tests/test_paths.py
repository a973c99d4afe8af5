"""Paths as a user types them: `~` and `$VARS` in every path setting, one meaning of relative paths,
and the workspace kept apart from the photo folders."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from likeness.cli import app
from likeness.profiles import SettingsError, load_profile, validate_settings
from likeness.settings import RunSettings, Settings
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def test_the_readme_example_finds_the_photos(home, photo):
    for i in range(2):
        photo(home / "photos" / "me" / f"me{i}.jpg", i, size=(64, 48))
    # README: likeness settings --profile sdxl-person --set concepts[0].path=~/photos/me --set training.epochs=300
    result = CliRunner().invoke(app, ["settings", "--profile", "sdxl-person", "--set", "concepts[0].path=~/photos/me",
                                      "--set", "training.epochs=300"])
    assert result.exit_code == 0, result.output
    assert f'path = "{home}/photos/me"' in result.output and "~" not in result.output
    settings = load_profile("sdxl-person", ["concepts[0].path=~/photos/me", "run.workspace=~/ws"])
    assert settings.concepts[0].path == home / "photos" / "me" and settings.run.workspace == home / "ws"
    ws = Workspace.from_settings(settings)
    _, report = scan_stage(settings.concepts[:1], 32, ws, ws.hashes())
    assert report.images == {"person": 2} and not report.errors


def test_every_path_setting_expands_home_and_variables(home, monkeypatch):
    monkeypatch.setenv("MODELS", "/srv/models")
    settings = validate_settings({
        "run": {"workspace": "$HOME/runs/one", "output_destination": "~/best"},
        "model": {"base_model": "${MODELS}/realvis.safetensors", "config": "~/configs/sdxl"},
        "concepts": [{"name": "me", "path": "~/photos/me", "caption": {"source": "text_file", "path": "~/me.txt"}}],
        "masks": {"model": "$MODELS/clipseg"}, "captioner": {"model": "~/blip"},
        "evaluation": {"dino_model": "$MODELS/dino", "clip_model": "~/clip"},
    })
    assert settings.run.workspace == home / "runs" / "one" and settings.run.output_destination == home / "best"
    assert settings.model.base_model == "/srv/models/realvis.safetensors" and settings.model.config == f"{home}/configs/sdxl"
    assert settings.concepts[0].path == home / "photos" / "me" and settings.concepts[0].caption.path == home / "me.txt"
    assert (settings.masks.model, settings.captioner.model) == ("/srv/models/clipseg", f"{home}/blip")
    assert (settings.evaluation.dino_model, settings.evaluation.clip_model) == ("/srv/models/dino", f"{home}/clip")
    assert Settings().model.base_model == "stabilityai/stable-diffusion-xl-base-1.0"  # hub ids are left alone


def test_an_unset_variable_is_an_error_naming_it(home, monkeypatch):
    monkeypatch.delenv("PHOTOS", raising=False)
    with pytest.raises(SettingsError) as raised:
        load_profile("sdxl-person", ["concepts[0].path=$PHOTOS/me"])
    assert "concepts[0].path: $PHOTOS is not set" in str(raised.value)


def test_relative_paths_are_relative_to_the_current_directory(home):
    settings = load_profile("sdxl-person", ["concepts[0].path=photos/me"])
    assert settings.concepts[0].path == Path("photos/me")  # kept as typed
    assert Workspace.from_settings(settings).root == home.parent / "workspace" / "sdxl-person"  # where likeness runs
    assert "relative to the current directory" in RunSettings.model_fields["workspace"].description


@pytest.mark.parametrize("workspace, concept, subdirectories, message", [
    ("photos/me/ws", "photos/me", True, "run.workspace ({ws}) lies inside concepts[0] 'person' folder ({photos}): likeness "
                                        "would write into your photo folder and, with include_subdirectories, train on its own"),
    ("photos/me", "photos/me", False, "run.workspace ({ws}) lies inside concepts[0] 'person' folder"),
    ("runs", "runs/photos/me", False, "concepts[0] 'person' folder ({photos}) lies inside run.workspace ({ws})"),
])
def test_workspace_and_photo_folders_stay_apart(home, workspace, concept, subdirectories, message):
    overrides = [f"run.workspace={workspace}", f"concepts[0].path={concept}",
                 f"concepts[0].include_subdirectories={str(subdirectories).lower()}"]
    with pytest.raises(SettingsError) as raised:
        load_profile("sdxl-person", overrides)
    ws, photos = home.parent / workspace, home.parent / concept
    assert message.format(ws=ws.resolve(), photos=photos.resolve()) in str(raised.value)


def test_output_destination_in_a_photo_folder_is_an_error(home):
    with pytest.raises(SettingsError, match="run.output_destination .* lies inside concepts\\[1\\] 'regularization'"):
        load_profile("sdxl-person", ["run.output_destination=photos/regularization/best"])
    assert load_profile("sdxl-person", ["run.workspace=photos/ws"]).run.workspace == Path("photos/ws")  # a sibling is fine
