"""The train flow on Prefect: trains, publishes the loss artifacts, and a re-run with nothing
changed is `Cached` (no model loaded); a missing prepare stage is a clear error."""

import time

import pytest
from typer.testing import CliRunner

from likeness.cli import app
from likeness.flows.train import train
from likeness.profiles import write_profile
from likeness.trainer import loop
from likeness.trainer.train_data import TrainDataError

pytestmark = pytest.mark.usefixtures("prefect_flows", "one_torch_thread")
QUIET = {"sampling": {"unit": "NEVER", "at_start": False}, "backups": {"unit": "NEVER"}}


def task_states(state, name="train-model"):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:  # task runs reach the server as events, a moment after the flow returns
            runs = [r for r in client.read_task_runs(flow_run_filter=flow_runs) if r.name.startswith(name)]
            if (runs and all(r.state and r.state.is_final() for r in runs)) or time.monotonic() > deadline:
                return [r.state.name for r in runs]
            time.sleep(0.2)


def latest_artifact(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


@pytest.mark.slow
def test_train_flow_runs_once_then_is_cached_with_artifacts(train_settings, monkeypatch):
    settings = train_settings(training={"epochs": 1}, **QUIET)
    first = train(settings, return_state=True)
    result = first.result()
    assert result.steps == 6 and result.final_checkpoint.is_file()
    assert task_states(first) == ["Completed"]
    from likeness.flows.watch import watch_dataset

    watched = watch_dataset(settings)  # a plain training told the watcher what it trained on
    assert not watched["changed"] and not watched["announced"]
    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("a cached run loaded the model"))
    second = train(settings, return_state=True)
    assert second.result().final_checkpoint == result.final_checkpoint
    assert task_states(second) == ["Cached"]
    table, curve = latest_artifact("loss-table"), latest_artifact("loss-curve")
    assert table is not None and curve is not None
    assert '"step"' in str(table.data) and "data:image/png;base64," in curve.data


def test_train_flow_names_the_missing_stage(train_settings, tmp_path):
    settings = train_settings(prepare=False)
    state = train(settings, return_state=True)
    with pytest.raises(TrainDataError, match=r"'manifest'.*likeness prepare --profile"):
        state.result()
    profile = write_profile(settings, tmp_path / "mine.toml")
    cli = CliRunner().invoke(app, ["train", "--profile", str(profile)])
    assert cli.exit_code == 2 and f"likeness prepare --profile {profile}" in cli.output
