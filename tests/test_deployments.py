"""Deployments: the table loads and matches prefect.yaml, the settings form reaches the UI with its
descriptions, bounds and choices, profiles resolve, retries only for transient errors; and against a
real server (slow): a pipeline run triggered through the API logs every stage, invalid parameters
are refused naming the field, a stage run alone names the missing earlier stage, and two `gpu`
tasks never overlap."""

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

from likeness.deployments import catalog, entry
from likeness.deployments.catalog import DEPLOYMENTS, available_deployments, render_prefect_yaml, runner_deployments
from likeness.deployments.entry import StageUnavailableError, resolve_settings, stage_flow
from likeness.profiles import SettingsError, load_profile
from likeness.settings import Settings
from likeness.stages import MissingStageError
from likeness.tasks.common import backoff, transient

REPO = Path(__file__).resolve().parents[1]
PREPARE_TASKS = {"scan-images", "resize-images", "compute-masks", "write-captions", "balance-concepts",
                 "write-manifest", "cache-latents"}


# --- the table and prefect.yaml --------------------------------------------------------------


def test_prefect_yaml_is_the_table_rendered_and_every_entrypoint_loads(monkeypatch):
    text = (REPO / "prefect.yaml").read_text()
    assert text == render_prefect_yaml(), "prefect.yaml drifted: python -m likeness.deployments.catalog > prefect.yaml"
    document = yaml.safe_load(text)
    rows = {row["name"]: row for row in document["deployments"]}
    assert set(rows) == {name for spec in DEPLOYMENTS for name in (spec.name, f"{spec.name}-k8s")}
    monkeypatch.chdir(REPO)
    loaded = {e: load_flow_from_entrypoint(e).name for e in {row["entrypoint"] for row in rows.values()}}
    assert all(loaded[rows[spec.name]["entrypoint"]] == spec.flow_name for spec in DEPLOYMENTS)
    assert rows["train"]["work_pool"]["name"] == rows["pipeline"]["work_pool"]["name"] == "gpu"
    assert rows["train"]["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert {rows[n]["work_pool"]["name"] for n in ("prepare", "stage-masks", "evaluate", "select", "watch")} == {"cpu"}
    assert rows["pipeline"]["triggers"][0]["expect"] == ["likeness.dataset.changed"]
    assert rows["watch"]["schedules"][0]["interval"] == 3600
    assert all(r["work_pool"]["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "diffusers,transformers"
               for r in rows.values())


def test_every_installed_stage_gets_a_deployment():
    names = {spec.name for spec in available_deployments()}
    assert {"pipeline", "prepare", "watch", *(f"stage-{s}" for s in ("scan", "resize", "masks", "captions",
                                                                        "balance", "manifest", "latents"))} <= names
    for spec in DEPLOYMENTS:  # train/evaluate/select appear as soon as their module exists
        module = entry.STAGE_FLOWS[spec.needs][0]
        assert (spec in available_deployments()) == os.path.exists(REPO / "flows" / f"{module.rsplit('.', 1)[1]}.py")


def test_a_missing_stage_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(entry.STAGE_FLOWS, "train", ("likeness.flows.not_there", "train"))
    with pytest.raises(StageUnavailableError, match="likeness.flows.not_there is not installed"):
        stage_flow("train")
    assert not catalog.available(catalog.DeploymentSpec("train", "run_train", "train", "gpu"))


def test_runner_deployments_carry_profile_schedule_and_trigger():
    settings = load_profile("demo-cpu", ["watch.cron=*/5 * * * *", "training.epochs=2"])
    built = {d.name: d for d in runner_deployments(settings, "demo-cpu", ["watch.cron=*/5 * * * *", "training.epochs=2"])}
    # the form opens on the profile's values, with the serve overrides already in them
    assert built["stage-masks"].parameters == {"profile": "demo-cpu", "settings": settings.model_dump(mode="json"),
                                               "overrides": [], "stage": "masks"}
    assert built["stage-masks"].parameters["settings"]["training"]["epochs"] == 2
    assert built["watch"].schedules[0].schedule.cron == "*/5 * * * *"
    trigger = built["pipeline"].triggers[0]
    assert trigger.expect == {"likeness.dataset.changed"}
    assert trigger.parameters["settings"] == "{{ event.payload.settings }}"
    hourly = {d.name: d for d in runner_deployments(load_profile("demo-cpu"), "demo-cpu")}["watch"]
    assert hourly.schedules[0].schedule.interval == timedelta(minutes=60)


# --- the form --------------------------------------------------------------------------------


def test_settings_parameter_is_a_form_with_descriptions_bounds_and_choices():
    schema = parameter_schema(entry.run_pipeline).model_dump_for_openapi()
    props, defs = schema["properties"], schema["definitions"]
    assert {"$ref": "#/definitions/Settings"} in props["settings"]["anyOf"]
    assert "profile" in props["profile"]["description"]
    assert defs["TrainingSettings"]["properties"]["epochs"]["minimum"] == 1
    assert defs["ResizeSettings"]["properties"]["resolution"]["multipleOf"] == 64
    assert "one per CPU core" in defs["RunSettings"]["properties"]["workers"]["description"]
    assert defs["OptimizerSettings"]["properties"]["name"]["enum"] == ["ADAFACTOR", "ADAMW"]
    stage = parameter_schema(entry.run_stage).model_dump_for_openapi()["properties"]["stage"]
    assert stage["enum"] == ["generate", "scan", "resize", "masks", "captions", "balance", "manifest", "latents"]


def test_resolve_settings_profile_form_and_overrides(tmp_path):
    assert resolve_settings("demo-cpu", None).run.name == "demo-cpu"
    form = Settings.model_validate({"run": {"name": "from-form"}})
    assert resolve_settings("demo-cpu", form, ["training.epochs=7"]).run.name == "from-form"
    assert resolve_settings(None, form.model_dump(mode="json"), ["training.epochs=7"]).training.epochs == 7
    with pytest.raises(ValueError, match="give a profile name"):
        resolve_settings(None, None)
    with pytest.raises(SettingsError, match=r"training\.epochs"):
        resolve_settings("demo-cpu", None, ["training.epochs=0"])


# --- retries ---------------------------------------------------------------------------------


class _Failed:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize("exc, retried", [
    (OSError("disk hiccup"), True),
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MissingStageError("masks", "resize", Path("ws/prepare/resize.json")), False),
    (SettingsError(["training.epochs: must be >= 1"]), False),
    (KeyError("a bug"), False),
])
def test_only_transient_errors_are_retried(exc, retried):
    assert transient(None, None, _Failed(exc)) is retried


def test_cuda_out_of_memory_is_retried():
    import torch

    assert transient(None, None, _Failed(torch.cuda.OutOfMemoryError("CUDA out of memory"))) is True


def test_backoff_doubles():
    assert backoff(3, 10) == [10, 20, 40]
    assert backoff(0, 5) == [5]


# --- against a real server (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_run_from_the_api_logs_every_stage(served, pipeline_run):
    assert pipeline_run["state"]["type"] == "COMPLETED", pipeline_run["state"]
    tree = served.run_tree(pipeline_run["id"])
    tasks = served.task_runs([r["id"] for r in tree])
    logged = {log["task_run_id"] for log in served.logs([r["id"] for r in tree]) if log["task_run_id"]}
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    assert PREPARE_TASKS <= names
    subflow_calls = {r["parent_task_run_id"] for r in tree}  # a subflow shows as a task run in its parent
    silent = [t["name"] for t in tasks if t["id"] not in logged | subflow_calls]
    assert not silent, f"task runs with no log line in the UI: {silent}"
    messages = [log["message"] for log in served.logs([r["id"] for r in tree])]
    assert any(m.startswith("masks: ") and "processed" in m for m in messages)
    flows = {r["name"] for r in tree}
    assert len(flows) >= 2  # the entry flow and its stage subflows


@pytest.mark.slow
def test_the_demo_generates_class_images_and_evaluates_during_training_cached_on_a_rerun(served, pipeline_run):
    """Issue 14 on the demo profile: 4 regularization images from the base model, one in-training
    evaluation (the last epoch: 1 in the served runs); a second run reuses both (Cached)."""
    messages = [log["message"] for log in served.logs([r["id"] for r in served.run_tree(pipeline_run["id"])])]
    assert any(m.startswith("generate: 4 processed, 0 reused") for m in messages), messages
    assert any(m.startswith("evaluation at epoch 1:") and "clip_t" in m for m in messages)
    response = served.create_run("likeness-pipeline/pipeline")
    assert response.status_code == 201, response.text
    rerun = served.wait(response.json()["id"], timeout=600)
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    tasks = served.task_runs([r["id"] for r in served.run_tree(rerun["id"])])
    states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in tasks}
    assert states["generate-regularization"] == "Cached" and states["train-model"] == "Cached", states


@pytest.mark.slow
def test_server_refuses_invalid_parameters_naming_the_field(served):
    for parameters, field in [({"settings": {"training": {"epochs": 0}}}, "settings.training.epochs"),
                              ({"settings": {"resize": {"resolution": 100}}}, "settings.resize.resolution"),
                              ({"settings": {"optimizer": {"name": "SGD"}}}, "settings.optimizer.name")]:
        response = served.create_run("likeness-pipeline/pipeline", parameters)
        assert response.status_code == 409 and field in response.json()["detail"], response.text
    response = served.create_run("likeness-stage/stage-masks", {"stage": "paint"})
    assert response.status_code == 409 and "stage" in response.json()["detail"]


@pytest.mark.slow
def test_a_stage_alone_names_the_missing_earlier_stage(served):
    response = served.create_run("likeness-stage/stage-resize", {"overrides": ["run.workspace=workspace/empty"]})
    assert response.status_code == 201, response.text
    run = served.wait(response.json()["id"], timeout=120)
    assert run["state"]["type"] == "FAILED"
    deadline = time.monotonic() + 30  # logs are shipped in batches: the last ones may land after the state
    while True:
        messages = "\n".join(log["message"] for log in served.logs([r["id"] for r in served.run_tree(run["id"])]))
        if "likeness stage scan" in messages or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "stage 'resize' needs the output of stage 'scan'" in messages
    assert "run `likeness stage scan --profile demo-cpu`" in messages and "<profile>" not in messages


@pytest.mark.slow
def test_serve_wrote_the_missing_demo_files_as_the_docs_promise(served):
    printed = (served.root / "serve.log").read_text(errors="replace")
    assert "[serve] the demo files are missing" in printed and "[demo] photos in" in printed
    demo = served.root / "workspace" / "demo"
    assert len(list((demo / "photos" / "person").glob("*.jpg"))) == 8
    assert (demo / "models" / "sdxl" / "model_index.json").is_file()


@pytest.mark.slow
def test_the_api_refuses_bad_parameters_before_a_run_exists(served):
    """Unknown or ill-typed parameters at every level: the client call fails (409), no run is created."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = served.deployment("likeness-pipeline/pipeline")
    before = len(served.runs(deployment_id={"any_": [deployment["id"]]}))
    bad = [{"unknown": 1}, {"profile": "no-such-profile"}, {"profile": 3}, {"overrides": "training.epochs=3"},
           {"settings": {"trainig": {}}}, {"settings": {"training": {"epochs": "three"}}},
           {"settings": {"training": {"unet": {"learning_rat": 1e-5}}}},
           {"settings": {"concepts": [{"name": "x", "path": "p", "colour": "red"}]}}]
    with temporary_settings({PREFECT_API_URL: f"{served.url}/api"}), get_client(sync_client=True) as client:
        for parameters in bad:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment["id"], parameters=parameters)
            assert refused.value.response.status_code == 409, parameters
    assert len(served.runs(deployment_id={"any_": [deployment["id"]]})) == before


@pytest.mark.slow
def test_the_pipeline_run_carries_its_result(served, pipeline_run):
    """The run the user started: the chosen checkpoint and why as its state message, a summary artifact
    with the overview grid and links to the stage runs' artifacts; the masks and scan artifacts below."""
    message = pipeline_run["state"]["message"]
    assert ".safetensors: " in message and "workspace/demo/run/output" in message, message
    tree = served.run_tree(pipeline_run["id"])
    artifacts = served.api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [r["id"] for r in tree]}}}).json()
    by_key = {a["key"]: a for a in artifacts}
    summary = by_key["summary"]
    assert summary["flow_run_id"] == pipeline_run["id"]
    assert message.split(": ", 1)[1] in summary["data"] and "data:image/jpeg;base64," in summary["data"]
    linked = {r["id"] for r in tree[1:]}
    assert linked and all(f"/runs/flow-run/{run_id}?tab=Artifacts" in summary["data"] for run_id in linked)
    assert f"/artifacts/artifact/{by_key['grid']['id']}" in summary["data"]
    assert "data:image/jpeg;base64," in by_key["mask-overlays"]["data"]
    scan_rows = json.loads(by_key["scan-files"]["data"]) if isinstance(by_key["scan-files"]["data"], str) else by_key["scan-files"]["data"]
    assert len(scan_rows) == 24 and {row["verdict"] for row in scan_rows} == {"ok"}  # 20 photos + 4 generated class images
    logs = "\n".join(log["message"] for log in served.logs([pipeline_run["id"]]))
    assert "settings from the settings form (opened on profile 'demo-cpu'), changed: nothing" in logs


GPU_PROBE = textwrap.dedent("""
    import json, sys, time
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(tags=sys.argv[1:])
    def hold(i):
        start = time.time(); time.sleep(1.5); return (start, time.time())

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def two_at_once():
        return [f.result() for f in [hold.submit(0), hold.submit(1)]]

    print(json.dumps(two_at_once()))
""")


@pytest.mark.slow
def test_gpu_tasks_never_overlap(served):
    env = served.env()

    def intervals(*tags):
        out = subprocess.run([sys.executable, "-c", GPU_PROBE, *tags], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return sorted(json.loads(out.stdout.strip().splitlines()[-1]))

    limits = served.api.post("/concurrency_limits/filter", json={}).json()
    assert {(lim["tag"], lim["concurrency_limit"]) for lim in limits} >= {("gpu", 1)}  # made by `likeness serve`
    (_, first_end), (second_start, _) = intervals("gpu")
    assert second_start >= first_end - 0.05, "two gpu-tagged tasks ran at the same time"
    (_, first_end), (second_start, _) = intervals("cpu-only")  # the probe can see overlap when there is one
    assert second_start < first_end


def test_library_loggers_reach_the_prefect_api():
    import logging

    from prefect.logging.handlers import APILogHandler

    entry.route_library_logs()
    api = [h for h in logging.getLogger("prefect.extra").handlers if isinstance(h, APILogHandler)]
    assert api, "Prefect's extra-logger config has no API handler"
    for name in ("diffusers", "transformers"):
        assert set(api) <= set(logging.getLogger(name).handlers)


LOG_PROBE = textwrap.dedent("""
    import logging
    from prefect import flow

    @flow
    def library_logs():
        logging.getLogger("diffusers.models.probe").warning("probe from diffusers")
        logging.getLogger("transformers.probe").warning("probe from transformers")
        return 1

    library_logs()
""")


@pytest.mark.slow
def test_library_logs_reach_the_run_in_the_ui(served):
    env = {**served.env(), **catalog.LIBRARY_LOGGERS_ENV}  # as `likeness serve` and prefect.yaml set it
    out = subprocess.run([sys.executable, "-c", LOG_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import time

    deadline = time.monotonic() + 20
    while True:
        found = served.api.post("/logs/filter", json={"logs": {"text": {"query": '"probe from"'}}, "sort": "TIMESTAMP_DESC", "limit": 200}).json()
        logs = [log for log in found if log["message"].startswith("probe from ")]
        if len(logs) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(log["message"] for log in logs) == ["probe from diffusers", "probe from transformers"]
    assert sorted(log["name"] for log in logs) == ["diffusers.models.probe", "transformers.probe"]
    assert all(log["flow_run_id"] for log in logs)  # attached to the run, so the run's Logs tab shows them


@pytest.mark.slow
def test_prefect_yaml_deploys_to_work_pools_and_a_cpu_worker_runs_a_stage(served, tmp_path):
    """Way 2: `prefect deploy --all` with rows of this repository's prefect.yaml, then a `cpu` worker runs a stage.

    The deployments get a `pool-` prefix here so they do not replace the ones `likeness serve` holds."""
    env = {**served.env(), "PREFECT_CLI_PROMPT": "false"}
    prefect = [sys.executable, "-m", "prefect"]

    def cli(*args, cwd=REPO):
        out = subprocess.run([*prefect, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out.stdout

    document = yaml.safe_load((REPO / "prefect.yaml").read_text())
    # the rows checked below, as they are (deploying all 13 only repeats the same code path, slowly)
    document["deployments"] = [row for row in document["deployments"]
                               if row["name"] in ("pipeline", "train", "watch", "stage-scan")]
    for row in document["deployments"]:
        row["name"] = f"pool-{row['name']}"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(document))
    cli("work-pool", "create", "cpu", "--type", "process")
    cli("work-pool", "create", "gpu", "--type", "process")
    cli("work-pool", "set-concurrency-limit", "gpu", "1")
    cli("deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))

    train = served.deployment("likeness-train/pool-train")
    assert train["work_pool_name"] == "gpu" and train["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert train["global_concurrency_limit"]["limit"] == 1
    watch = served.deployment("likeness-watch/pool-watch")
    assert watch["work_pool_name"] == "cpu" and watch["schedules"][0]["schedule"]["interval"] == 3600
    assert watch["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    automations = served.api.post("/automations/filter", json={}).json()
    assert any(a["trigger"].get("expect") == ["likeness.dataset.changed"]
               and a["actions"][0].get("deployment_id") == served.deployment("likeness-pipeline/pool-pipeline")["id"]
               for a in automations)

    photos = served.root / "workspace" / "demo" / "photos"
    overrides = [f"run.workspace={tmp_path / 'ws'}", f"concepts[0].path={photos / 'person'}",
                 f"concepts[1].path={photos / 'regularization'}"]
    response = served.create_run("likeness-stage/pool-stage-scan", {"overrides": overrides})
    assert response.status_code == 201, response.text
    cli("worker", "start", "--pool", "cpu", "--run-once", cwd=tmp_path)
    run = served.wait(response.json()["id"], timeout=180)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert (tmp_path / "ws" / "prepare" / "scan.json").is_file()


def _listening_addresses(port: int) -> list[str]:
    """IPv4/IPv6 addresses with a socket listening on `port` (Linux /proc/net)."""
    import ipaddress

    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.append(str(ipaddress.ip_address(words[:width])))
    return found


@pytest.mark.slow
def test_likeness_server_prints_the_ui_and_listens_on_loopback_only(served):
    printed = (served.root / "server.log").read_text(errors="replace")
    assert f"Prefect UI:  http://127.0.0.1:{served.port}" in printed
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert _listening_addresses(served.port) == ["127.0.0.1"]
