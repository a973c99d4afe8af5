"""A crashed training starts again by itself: the train deployment's trigger fires on the
`prefect.flow-run.Crashed` event of its own runs only, the re-run gets the crashed run's parameters
with `resumes` + 1 (rendered as the Prefect server renders them), and past run.crash_resumes the
run refuses to start, naming the crashes."""

from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect.server.events.schemas.automations import EventTrigger
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

from likeness.deployments import catalog, entry


def crashed_event(deployment: str, flow: str = "likeness-train", event: str = "prefect.flow-run.Crashed"):
    return ReceivedEvent(
        occurred="2026-12-01T20:00:00Z", event=event, id=uuid4(),
        resource={"prefect.resource.id": f"prefect.flow-run.{uuid4()}", "prefect.resource.name": "brisk-otter"},
        related=[{"prefect.resource.id": f"prefect.flow.{uuid4()}", "prefect.resource.role": "flow",
                  "prefect.resource.name": flow},
                 {"prefect.resource.id": f"prefect.deployment.{uuid4()}", "prefect.resource.role": "deployment",
                  "prefect.resource.name": deployment}])


def test_the_trigger_fires_on_a_crash_of_its_own_deployment_only():
    deployment_trigger = catalog._trigger(catalog.resume_trigger("train"))  # what serve / prefect deploy build
    data = deployment_trigger.model_dump(mode="json")
    trigger = EventTrigger.model_validate({k: v for k, v in data.items() if k in EventTrigger.model_fields})
    assert trigger.covers(crashed_event("train"))
    assert not trigger.covers(crashed_event("train-k8s"))
    assert not trigger.covers(crashed_event("evaluate", "likeness-evaluate"))
    assert not trigger.covers(crashed_event("train", event="prefect.flow-run.Failed"))  # a bad config: no loop
    served = {d.name: d for d in catalog.runner_deployments(entry.resolve_settings("demo-cpu", None), "demo-cpu")}
    assert [t.expect for t in served["train"].triggers] == [{"prefect.flow-run.Crashed"}]  # `likeness serve` too


@pytest.mark.parametrize("before, after", [
    ({"profile": "demo-cpu", "overrides": ["training.epochs=3"]}, {"resumes": 1}),
    ({"profile": None, "settings": {"run": {"name": "x"}}, "overrides": None, "resumes": 2}, {"resumes": 3}),
])
def test_the_rerun_gets_the_crashed_runs_parameters_and_one_more_resume(before, after):
    parameters = catalog.resume_trigger("train")["parameters"]
    flow_run = SimpleNamespace(parameters=before)
    rendered = hydrate(parameters, HydrationContext(render_jinja=True, raise_on_error=True,
                                                    jinja_context={"flow_run": flow_run}))
    expected = {name: before.get(name) for name in catalog.RESUMED_PARAMETERS} | after
    assert rendered == expected


def test_past_the_limit_the_run_refuses_naming_the_crashes():
    entry.check_resumes(0, 3)
    with pytest.raises(entry.CrashedTooOftenError, match=r"crashed 4 times in a row \(run.crash_resumes = 3\)"):
        entry.check_resumes(4, 3)


# --- for real: a server, `likeness serve`, a SIGKILL ------------------------------------------


def _flow_run_processes(run_id: str) -> list[int]:
    """Processes started for one flow run (the runner gives each its id in the environment)."""
    import os
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PREFECT__FLOW_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.slow
def test_a_killed_training_is_started_again_and_ends_with_the_weights_of_an_uninterrupted_run(served, tmp_path):
    import os
    import shutil
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from likeness.workspace import Workspace

    def overrides(workspace):
        return [f"run.workspace={workspace}", "training.epochs=1", "sampling.at_start=false", "sampling.unit=NEVER",
                "saving.unit=NEVER", "backups.every=1", "backups.unit=STEP"]

    crashed_ws, clean_ws = tmp_path / "crashed", tmp_path / "clean"
    prepared = served.wait(served.create_run("likeness-prepare/prepare", {"overrides": overrides(crashed_ws)}).json()["id"])
    assert prepared["state"]["type"] == "COMPLETED", prepared["state"]
    shutil.copytree(crashed_ws, clean_ws)

    run = served.create_run("likeness-train/train", {"overrides": overrides(crashed_ws)}).json()
    deadline = time.monotonic() + 120
    while not list(Workspace(crashed_ws).backups.glob("backup-*")):
        assert time.monotonic() < deadline and served.api.get(f"/flow_runs/{run['id']}").json()["state"]["type"] \
            in ("SCHEDULED", "PENDING", "RUNNING"), "the training ended or hung before its first backup"
        time.sleep(0.1)
    for pid in _flow_run_processes(run["id"]):
        os.kill(pid, signal.SIGKILL)
    assert served.wait(run["id"], timeout=60)["state"]["type"] == "CRASHED"

    deployment = served.deployment("likeness-train/train")["id"]
    deadline = time.monotonic() + 60
    while not (again := [r for r in served.runs(deployment_id={"any_": [deployment]})
                         if r["parameters"].get("resumes") == 1 and r["id"] != run["id"]
                         and f"run.workspace={crashed_ws}" in r["parameters"]["overrides"]]):
        assert time.monotonic() < deadline, "no run was started after the crash"
        time.sleep(0.5)
    resumed = served.wait(again[0]["id"], timeout=180)
    assert resumed["state"]["type"] == "COMPLETED", resumed["state"]
    assert resumed["parameters"]["overrides"] == overrides(crashed_ws)
    deadline, messages = time.monotonic() + 30, []
    while not any("resumed from" in m for m in messages) and time.monotonic() < deadline:
        time.sleep(1)
        messages = [log["message"] for log in served.logs([r["id"] for r in served.run_tree(resumed["id"])])]
    assert any("resumed from" in m and "backup-" in m for m in messages), messages[-20:]

    clean = served.wait(served.create_run("likeness-train/train", {"overrides": overrides(clean_ws)}).json()["id"])
    assert clean["state"]["type"] == "COMPLETED", clean["state"]
    expected = load_file(next(Workspace(clean_ws).checkpoints.glob("*.safetensors")))
    weights = load_file(next(Workspace(crashed_ws).checkpoints.glob("*.safetensors")))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
