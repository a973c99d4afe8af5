"""The dataset watcher: no change -> no event and no run; one changed photo -> one
`likeness.dataset.changed` event -> exactly one triggered pipeline run that redoes only that photo.

Fast tests run the watcher flow on the test harness with the event recorded; the slow one uses the
real server, `likeness serve` and the pipeline deployment's trigger."""

import time
from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from likeness.cli import app
from likeness.flows.watch import watch_dataset
from likeness.profiles import write_profile
from likeness.tasks import watch as watch_tasks
from likeness.tasks.watch import WatchState, record_trained, watch_state_path


@pytest.fixture
def settings(tmp_path, photo):
    """Two concept folders of real photos and a workspace (the watcher loads no model)."""
    from likeness.settings import Settings

    person, reg = tmp_path / "photos" / "person", tmp_path / "photos" / "reg"
    for i in range(3):
        photo(person / f"p{i}.jpg", i, size=(64, 64), quality=95)
    for i in range(2):
        photo(reg / f"r{i}.png", i + 3, size=(48, 48))
    return Settings.model_validate({
        "run": {"workspace": str(tmp_path / "ws")},
        "concepts": [{"name": "person", "path": str(person), "caption": {"source": "text", "text": "ohwx man"}},
                     {"name": "reg", "path": str(reg), "role": "regularization", "balancing": "auto"}],
    })


@pytest.fixture
def emitted(monkeypatch):
    """Events the watcher emits, recorded instead of sent."""
    events = []

    def record(event, resource, payload=None, **kwargs):
        events.append({"event": event, "resource": resource, "payload": payload})
    monkeypatch.setattr(watch_tasks, "emit_event", record)
    return events


@pytest.mark.usefixtures("prefect_flows")
def test_watcher_announces_once_and_only_on_a_content_change(settings, photo, emitted):
    person = settings.concepts[0].path
    first = watch_dataset(settings)
    assert first["changed"] and first["announced"]  # never trained: announce the dataset once
    assert emitted[0]["event"] == "likeness.dataset.changed"
    assert emitted[0]["payload"]["fingerprint"] == first["fingerprint"]
    assert emitted[0]["payload"]["settings"]["run"]["workspace"] == str(settings.run.workspace)
    assert emitted[0]["resource"]["prefect.resource.id"] == "likeness.dataset.likeness"
    assert not watch_dataset(settings)["announced"]  # announced, not trained yet: no second event
    assert len(emitted) == 1

    record_trained(settings.run.workspace, WatchState.load(watch_state_path(settings.run.workspace)).seen)
    (person / "p0.jpg").rename(person / "renamed.jpg")
    quiet = watch_dataset(settings)
    assert not quiet["changed"] and not quiet["announced"] and quiet["hashed"] == 1  # a rename is no change
    assert len(emitted) == 1

    photo(person / "p1.jpg", 4, size=(64, 64), quality=95)
    changed = watch_dataset(settings)
    assert changed["changed"] and changed["announced"] and changed["hashed"] == 1
    assert len(emitted) == 2 and emitted[1]["payload"]["added"] == 1 and emitted[1]["payload"]["removed"] == 1


@pytest.mark.usefixtures("prefect_flows")
def test_likeness_watch_command(settings, tmp_path, emitted):
    profile = tmp_path / "profile.toml"
    write_profile(settings, profile, "test")
    result = CliRunner().invoke(app, ["watch", "--profile", str(profile)])
    assert result.exit_code == 0, result.output
    assert "changed since the last training" in result.output and "retraining announced" in result.output
    missing = CliRunner().invoke(app, ["watch", "--profile", str(profile), "--set", "concepts[0].path=nowhere"])
    assert missing.exit_code == 2 and "concept 'person'" in missing.output


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _pipeline_runs(served) -> list[dict]:
    return served.runs(deployment_id={"any_": [served.deployment("likeness-pipeline/pipeline")["id"]]})


def _watch(served) -> dict:
    response = served.create_run("likeness-watch/watch")
    assert response.status_code == 201, response.text
    run = served.wait(response.json()["id"], timeout=120)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return run


def _events_arrived(served, since: str, timeout: float = 30) -> list[dict]:
    """The watcher's events since `since`, once the server has stored them (a few seconds late)."""
    deadline = time.monotonic() + timeout
    while not (events := served.events("likeness.dataset", since)) and time.monotonic() < deadline:
        time.sleep(1)
    return events


@pytest.mark.slow
def test_changed_photo_triggers_exactly_one_run_that_redoes_only_it(served, pipeline_run):
    from PIL import Image

    assert pipeline_run["state"]["type"] == "COMPLETED"
    runs_before = len(_pipeline_runs(served))

    since = _now()
    _watch(served)  # nothing changed since the pipeline run
    time.sleep(10)  # a trigger fires within seconds
    assert served.events("likeness.dataset", since) == []
    assert len(_pipeline_runs(served)) == runs_before

    photo = sorted((served.root / "workspace" / "demo" / "photos" / "person").glob("*"))[0]
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)  # one photo changed
    since = _now()
    _watch(served)
    events = _events_arrived(served, since)
    assert [e["event"] for e in events] == ["likeness.dataset.changed"]

    deadline = time.monotonic() + 60
    while len(_pipeline_runs(served)) == runs_before:
        assert time.monotonic() < deadline, "the dataset change started no pipeline run"
        time.sleep(1)
    triggered = _pipeline_runs(served)[-1]
    assert triggered["parameters"]["settings"]["run"]["name"] == "demo-cpu"
    prepared = _subflow_finished(served, triggered["id"], "prepare", timeout=300)
    assert prepared["state"]["type"] == "COMPLETED", prepared["state"]
    # The stage summary, not its progress lines ("latents: 1 / 1 images"), which arrive first.
    messages = _messages(served, prepared["id"], expect="latents: 1 processed")
    for stage in ("resize", "masks", "latents"):  # 20 photos + 4 generated, 1 changed: redone alone
        assert any(m.startswith(f"{stage}: 1 processed, 23 reused") for m in messages), \
            (stage, [m for m in messages if m.startswith(stage)])
    told = _messages(served, triggered["id"], expect="settings from ")
    assert any(m.startswith("settings from the likeness.dataset.changed event of the dataset watcher") for m in told), told
    assert len(_pipeline_runs(served)) == runs_before + 1  # exactly one run
    # training and evaluation of the new dataset are the pipeline's own tests: stop here to save minutes
    served.api.post(f"/flow_runs/{triggered['id']}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})


def _subflow_finished(served, run_id: str, flow_name: str, timeout: float) -> dict:
    """The subflow run of `flow_name` under `run_id`, once it is final."""
    flow_id = served.api.post("/flows/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()[0]["id"]
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in served.run_tree(run_id) if r["flow_id"] == flow_id]
        if found and found[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return found[0]
        assert time.monotonic() < deadline, f"no finished {flow_name} subflow under {run_id} after {timeout} s"
        time.sleep(1)


def _messages(served, run_id: str, expect: str, timeout: float = 30) -> list[str]:
    """Log messages of a run, once one starting with `expect` has arrived (logs come a few seconds late)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [log["message"] for log in served.logs([run_id])]
        if any(m.startswith(expect) for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)
