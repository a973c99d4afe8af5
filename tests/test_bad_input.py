"""Bad input gets one clean answer: the message once, exit 2, no traceback (`--debug` shows it), and
the Prefect run ends Failed with that message as its state message (what the UI shows).

The CLI runs in-process (typer's CliRunner, plus what Prefect's own terminal handler writes), and
once in a subprocess for a folder of broken photos, against the test session's Prefect server, to
see the user's whole terminal.
"""

import io
import logging
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from likeness.cli import app
from likeness.profiles import write_profile

NO_DEBUG = {"LIKENESS_DEBUG": None}  # CliRunner restores it afterwards: `--debug` sets it in-process


@pytest.fixture
def terminal():
    """Prefect's terminal handler writing into a buffer for the test (configured before CliRunner
    swaps sys.stderr, as the real CLI does)."""
    import prefect.main  # noqa: F401  (sets up Prefect's logging)

    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    assert handlers, "Prefect's terminal handler is not configured"
    buffer, files = io.StringIO(), [h.console.file for h in handlers]
    for handler in handlers:
        handler.console.file = buffer
    yield buffer
    for handler, file in zip(handlers, files):
        handler.console.file = file


def invoke(terminal, *args: str, env: dict | None = None) -> tuple[int, str]:
    """Exit code and everything the user would see (ours and Prefect's terminal lines)."""
    terminal.seek(0)
    terminal.truncate()
    result = CliRunner().invoke(app, list(args), env={**NO_DEBUG, **(env or {})})
    return result.exit_code, result.output + terminal.getvalue()


def last_flow_run(name: str):
    """The newest run of flow `name` on the test server, once its final state arrived."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)
            if (runs and runs[0].state.is_final()) or time.monotonic() > deadline:
                return runs[0]
            time.sleep(0.2)


def assert_clean(code: int, output: str, once: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    assert output.count(once) == 1, output


# --- settings: no Prefect involved --------------------------------------------------------------


def test_bad_set_value_is_named_once(terminal):
    code, output = invoke(terminal, "prepare", "--set", "training.batch_size=zero")
    assert_clean(code, output, "unable to parse string as an integer")
    assert "training.batch_size" in output


@pytest.mark.parametrize("how", [["--debug"], []])
def test_debug_shows_the_traceback(terminal, how):
    env = {} if how else {"LIKENESS_DEBUG": "1"}
    code, output = invoke(terminal, "settings", "--set", "training.batch_size=0", *how, env=env)
    assert code == 2 and "Traceback" in output and "training.batch_size: must be >= 1" in output


# --- data and stages: the flow ends Failed with the message ----------------------------------------


@pytest.mark.usefixtures("prefect_flows")
@pytest.mark.parametrize("problem, once", [("missing", "folder not found"), ("empty", "has no images")])
def test_missing_or_empty_folder(prepare_settings, tmp_path, terminal, problem, once):
    folder = tmp_path / "photos" / "nobody"
    if problem == "empty":
        folder.mkdir()
    settings = prepare_settings()
    settings.concepts[0].path = str(folder)
    profile = write_profile(settings, tmp_path / "profile.toml")
    code, output = invoke(terminal, "prepare", "--profile", str(profile))
    assert_clean(code, output, once)
    run = last_flow_run("prepare")
    assert run.state.is_failed() and once in run.state.message and str(folder) in run.state.message
    assert not run.state.message.startswith("Flow run encountered an exception")  # the message itself


@pytest.mark.usefixtures("prefect_flows")
def test_missing_earlier_stage(prepare_settings, tmp_path, terminal):
    profile = write_profile(prepare_settings(), tmp_path / "profile.toml")
    code, output = invoke(terminal, "stage", "masks", "--profile", str(profile))
    assert_clean(code, output, "needs the output of stage 'resize'")
    assert f"likeness stage resize --profile {profile}" in output
    run = last_flow_run("prepare-stage")
    assert run.state.is_failed() and run.state.message.startswith("stage 'masks' needs the output of stage 'resize'")


@pytest.mark.slow  # a subprocess: imports and a flow, ~15 s
@pytest.mark.usefixtures("prefect_flows")
def test_broken_folder_fits_a_screen(prepare_settings, tmp_path):
    """The whole terminal of `likeness prepare` on a folder with broken photos, as a user sees it."""
    from prefect.settings import PREFECT_API_URL

    person = prepare_settings.person
    bad = {"empty.jpg": b"", "text.jpg": b"not a jpeg", "cut.png": (person.parent / "reg" / "r0.png").read_bytes()[:200]}
    for name, data in bad.items():
        (person / name).write_bytes(data)
    profile = write_profile(prepare_settings(), tmp_path / "profile.toml")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}
    env.pop("LIKENESS_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "likeness", "prepare", "--profile", str(profile)],
                          capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and len(output.splitlines()) <= 30, output
    for name in bad:
        assert output.count(name) == 1, (name, output)
    run = last_flow_run("prepare")
    assert run.state.is_failed() and all(name in run.state.message for name in bad)


def test_console_filter_keeps_likeness_lines_and_drops_the_echoes():
    from likeness.stages import MissingStageError
    from likeness.terminal import UI_ONLY, ConsoleFilter, report_cleanly

    def record(message, exc=None, **extra):
        made = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, None,
                                 (type(exc), exc, None) if exc else None)
        made.__dict__.update(extra)
        return made

    keep = ConsoleFilter().filter
    assert keep(record("resize: 4 / 20 images"))
    assert not keep(record("pipeline done: ...", **UI_ONLY))
    exc = MissingStageError("masks", "resize", __import__("pathlib").Path("resize.json"))
    assert not keep(record("Task run failed with exception", exc))
    assert not keep(record("Finished in state Failed('Task run encountered an exception MissingStageError: x')"))
    report_cleanly("line one\nline two")
    assert not keep(record("Finished in state Failed('line one\\nline two')"))
    assert keep(record("Finished in state Failed('Task run encountered an exception OSError: disk full')"))
