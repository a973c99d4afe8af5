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
