"""The TensorBoard sink: event files TensorBoard's own reader reads back, settings, the CLI command."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [test] extra has it
from typer.testing import CliRunner

from likeness.cli import app
from likeness.settings import Settings
from likeness.trainer.tensorboard import TensorBoardMissing, TensorBoardSink, sinks_from_settings
from likeness.workspace import Workspace


def read_events(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_scalars_and_an_image_read_back(tmp_path):
    image = Image.fromarray(np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3))
    sink = TensorBoardSink(tmp_path / "tb")
    sink.scalars(1, {"loss": 0.25, "lr_unet": 1e-5})
    sink.scalars(2, {"loss": 0.125, "lr_unet": 1e-5})
    sink.image(2, "samples/0", image)
    sink.close()

    events = read_events(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {"loss", "lr_unet"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.25), (2, 0.125)]
    assert events.Scalars("lr_unet")[0].value == pytest.approx(1e-5)
    [written] = events.Images("samples/0")
    assert (written.step, written.width, written.height) == (2, 24, 16)
    decoded = np.asarray(Image.open(io.BytesIO(written.encoded_image_string)))
    assert np.array_equal(decoded, np.asarray(image))  # PNG: lossless


def test_a_resumed_run_replaces_the_steps_it_redoes(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in range(1, 6):
        first.scalars(step, {"loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, start_step=3)
    resumed.scalars(3, {"loss": 30.0})
    resumed.scalars(4, {"loss": 40.0})
    resumed.close()
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_sinks_from_settings_follow_the_setting(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert Settings().training.tensorboard is False
    assert sinks_from_settings(Settings(), ws) == []
    [sink] = sinks_from_settings(Settings.model_validate({"training": {"tensorboard": True}}), ws)
    assert isinstance(sink, TensorBoardSink) and sink.logdir == ws.tensorboard == ws.root / "tensorboard"
    sink.scalars(0, {"loss": 1.0})
    sink.close()
    assert list(ws.tensorboard.glob("events.out.tfevents.*"))


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it now fails
    settings = Settings.model_validate({"training": {"tensorboard": True}})
    with pytest.raises(TensorBoardMissing, match=r"likeness\[tensorboard\].*training.tensorboard = false"):
        sinks_from_settings(settings, Workspace(tmp_path))


def test_cli_prints_the_logdir_and_a_local_command(tmp_path):
    result = CliRunner().invoke(app, ["tensorboard", "--set", f"run.workspace={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert f"logdir:  {tmp_path / 'tensorboard'}" in result.output
    assert "-m tensorboard.main --logdir" in result.output and "--host 127.0.0.1 --port 6006" in result.output


def test_cli_start_runs_the_viewer_on_localhost(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command))
    result = CliRunner().invoke(app, ["tensorboard", "--start", "--port", "7007", "--set", f"run.workspace={tmp_path}",
                                      "--set", "training.tensorboard=true"])
    assert result.exit_code == 0, result.output
    [command] = calls
    assert command[command.index("--logdir") + 1] == str(tmp_path / "tensorboard")
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "7007"
