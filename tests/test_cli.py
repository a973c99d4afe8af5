"""The `likeness` command as a user meets it: the installed console script and its commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from likeness.cli import app

runner = CliRunner()
REFERENCE = Path(__file__).parent / "data" / "onetrainer-sdxl-person.json"


def test_installed_console_script_lists_its_commands():
    script = shutil.which("likeness", path=str(Path(sys.executable).parent))
    assert script, "the console script `likeness` is not installed next to this Python"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "import-onetrainer", "settings", "profiles", "tiny-models"):
        assert command in out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "likeness", "profiles"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["demo-cpu", "sd15-person", "sdxl-person", "sdxl-person-lora"]


def test_settings_shows_overrides():
    result = runner.invoke(app, ["settings", "--profile", "demo-cpu", "--set", "training.epochs=9"])
    assert result.exit_code == 0, result.output
    assert "epochs = 9" in result.output


def test_bad_override_exits_2_naming_the_field():
    result = runner.invoke(app, ["settings", "--set", "training.batch_size=0"])
    assert result.exit_code == 2
    assert "training.batch_size: must be >= 1" in result.output


def test_import_onetrainer_writes_a_profile_that_loads(tmp_path):
    target = tmp_path / "person.toml"
    result = runner.invoke(app, ["import-onetrainer", str(REFERENCE), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file() and "role regularization" in result.output
    shown = runner.invoke(app, ["settings", "--profile", str(target)])
    assert shown.exit_code == 0, shown.output
    assert "epochs = 400" in shown.output


def test_import_onetrainer_refuses_an_unsupported_method(tmp_path):
    config = tmp_path / "embedding.json"
    config.write_text(REFERENCE.read_text().replace('"FINE_TUNE"', '"EMBEDDING"'))
    result = runner.invoke(app, ["import-onetrainer", str(config), "-o", str(tmp_path / "x.toml")])
    assert result.exit_code == 2 and "training_method 'EMBEDDING' is not supported" in result.output
    assert not (tmp_path / "x.toml").exists()


# Library output the demo's terminal must not show (issue 11): bars, deprecation and fallback notices,
# the temporary server's telemetry, tracebacks.
NOISE = ("Loading weights", "Loading pipeline components", "Writing model shards", "torch_dtype", "kept in float32",
         "torchvision", "Failed to send telemetry", "Traceback", "FutureWarning", "UserWarning", "DeprecationWarning")


@pytest.mark.slow
def test_demo_terminal_shows_only_likeness_lines_each_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "LIKENESS_DEBUG"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}  # its own temporary server, as a user's
    done = subprocess.run([sys.executable, "-m", "likeness", "demo", "--set", "training.epochs=2",
                           "--set", "evaluation.seeds_per_prompt=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert [noise for noise in NOISE if noise in output] == [], output
    assert output.count("chosen checkpoint:") == 1 and output.count("all checkpoints:") == 1, output
    assert output.count("train: ") == 1 and "[demo] done in" in output, output

    # the re-run, all Cached, loads no model library (issue 18: seconds for what is already done)
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "likeness", "demo", "--set", "training.epochs=2",
                            "--set", "evaluation.seeds_per_prompt=1"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert imported & {"torch", "diffusers", "transformers", "peft", "cv2"} == set(), again.stdout
    states = [line for line in again.stderr.splitlines() if "Task run" in line and "Finished in state" in line]
    cached = [line for line in states if "Cached" in line]  # every stage; a few report tasks run each time
    assert len(cached) >= 10 and any("'train-model-" in line for line in cached), states
    assert "chosen checkpoint:" in again.stdout, again.stdout
