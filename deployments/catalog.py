"""Every likeness deployment in one table, and the two ways to run them.

1. `likeness serve` (the embedded default): `serve_all()` serves every deployment from one
   process; runs execute as subprocesses of it. Nothing else to set up.
2. Work pools: `prefect.yaml` (written from this table by `render_prefect_yaml()`), a `cpu` process
   pool for preprocessing and evaluation and a `gpu` pool for training, so a GPU box runs only a
   `gpu` worker. `prefect deploy --all` registers them.

Either way the watcher runs on a schedule from `settings.watch`, the pipeline has a trigger on
`likeness.dataset.changed`, and training holds the `gpu` tag concurrency slot (limit 1 unless the
user set another), so two runs never share a GPU.

    python -m likeness.deployments.catalog          # print prefect.yaml as this table renders it
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from likeness.deployments import entry
from likeness.deployments.form import strict_form
from likeness.settings import Settings, WatchSettings

DATASET_CHANGED = "likeness.dataset.changed"  # the event the watcher emits (tasks/watch.py)
GPU_TAG = "gpu"  # the training task's tag; a tag concurrency limit of 1 serialises GPU work
LIBRARY_LOGGERS_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(entry.LIBRARY_LOGGERS)}
RETRAIN_TRIGGER = {
    "type": "event",
    "name": "retrain when the dataset changed",
    "expect": [DATASET_CHANGED],
    "match": {"prefect.resource.id": "likeness.dataset.*"},
    # the watcher's own settings, so the retraining sees exactly the folders it fingerprinted
    "parameters": {"settings": "{{ event.payload.settings }}", "overrides": []},
}

CRASHED = "prefect.flow-run.Crashed"  # a run killed outright: SIGKILL, the OOM killer, a lost node
RESUMED_PARAMETERS = ("profile", "settings", "overrides")


def _from_crashed_run(expression: str) -> dict[str, Any]:
    """A parameter of the re-run, rendered by the server from the crashed run (JSON of a Jinja template)."""
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ (" + expression + ") | tojson }}"}}


def resume_trigger(deployment: str, flow_name: str = "likeness-train") -> dict[str, Any]:
    """The deployment trigger that starts a crashed training again with the same parameters.

    The new run resumes from the last backup by itself (trainer/loop.py); `resumes` counts the
    restarts in a row, and run_train refuses to start past `run.crash_resumes` (a Failed run
    naming the crashes), so a run that always crashes does not loop.
    """
    parameters = {name: _from_crashed_run(f"flow_run.parameters.get('{name}')") for name in RESUMED_PARAMETERS}
    parameters["resumes"] = _from_crashed_run("flow_run.parameters.get('resumes', 0) + 1")
    return {
        "type": "event",
        "name": f"resume a crashed {deployment}",
        "expect": [CRASHED],
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": [{"prefect.resource.role": "flow", "prefect.resource.name": flow_name},
                          {"prefect.resource.role": "deployment", "prefect.resource.name": deployment}],
        "parameters": parameters,
    }


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its name, entry flow, the stage module it needs, and where it runs."""

    name: str
    flow: str  # attribute of likeness.deployments.entry
    needs: str  # key of entry.STAGE_FLOWS whose module must exist
    pool: str  # "cpu" or "gpu"
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def entrypoint(self) -> str:
        return f"deployments/entry.py:{self.flow}"

    @property
    def tags(self) -> list[str]:
        # not the bare pool name: a `gpu` tag on the run would not hold the task slot, only confuse
        return ["likeness", f"{self.pool}-pool"]

    @property
    def flow_name(self) -> str:
        return getattr(entry, self.flow).name

    @property
    def full_name(self) -> str:
        """`<flow name>/<deployment name>`, as `run_deployment` and the CLI take it."""
        return f"{self.flow_name}/{self.name}"


DEPLOYMENTS = (
    DeploymentSpec("pipeline", "run_pipeline", "pipeline", "gpu"),
    DeploymentSpec("prepare", "run_prepare", "prepare", "cpu"),
    *(DeploymentSpec(f"stage-{s}", "run_stage", "prepare", "cpu", {"stage": s})
      for s in ("scan", "resize", "masks", "captions", "balance", "manifest", "latents")),
    DeploymentSpec("train", "run_train", "train", "gpu"),
    DeploymentSpec("evaluate", "run_evaluate", "evaluate", "cpu"),
    DeploymentSpec("select", "run_select", "select", "cpu"),
    DeploymentSpec("compare-faces", "run_compare_faces", "compare-faces", "cpu"),
    DeploymentSpec("extract-lora", "run_extract_lora", "extract-lora", "cpu"),
    DeploymentSpec("watch", "run_watch", "watch", "cpu"),
)


def available(spec: DeploymentSpec) -> bool:
    """Whether the stage flow a deployment runs is installed (train/evaluate land after prepare)."""
    return importlib.util.find_spec(entry.STAGE_FLOWS[spec.needs][0]) is not None


def available_deployments() -> list[DeploymentSpec]:
    return [spec for spec in DEPLOYMENTS if available(spec)]


def watch_schedule(watch: WatchSettings) -> dict[str, Any]:
    """`to_deployment` schedule arguments from the watcher settings: cron if set, else the interval."""
    if watch.cron:
        return {"cron": watch.cron}
    return {"interval": timedelta(minutes=watch.interval_minutes)}


def form_defaults(settings: Settings, profile: str) -> dict[str, Any]:
    """The run form's defaults: the served profile and its settings (with `serve --set` applied), so
    Custom run opens on the profile's values; the overrides field starts empty (they are in the settings)."""
    return {"profile": profile, "settings": settings.model_dump(mode="json"), "overrides": []}


def runner_deployments(settings: Settings, profile: str, overrides: list[str] | None = None) -> list[Any]:
    """The installed deployments, for `serve`: the form opens on the profile's settings (`overrides`
    are already in `settings`), and its parameter schema is strict (deployments/form.py)."""
    built = []
    for spec in available_deployments():
        flow = getattr(entry, spec.flow)
        extra: dict[str, Any] = {}
        if spec.name == "watch":
            extra = watch_schedule(settings.watch)
        if spec.name == "pipeline":
            extra["triggers"] = [_trigger()]
        if spec.name == "train":
            extra["triggers"] = [_trigger(resume_trigger(spec.name))]
        built.append(strict_form(flow.to_deployment(
            name=spec.name, tags=spec.tags, description=flow.description,
            parameters={**form_defaults(settings, profile), **spec.parameters}, **extra), profile))
    return built


def _trigger(spec: dict[str, Any] = RETRAIN_TRIGGER) -> Any:
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(**{k: v for k, v in spec.items() if k != "type"})


def ensure_gpu_limit(limit: int = 1) -> int:
    """Create the `gpu` tag concurrency limit if there is none; returns the limit in force.

    A limit the user set (e.g. 2 on a two-GPU box) is kept.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)
            return limit


def serve_all(settings: Settings, profile: str, overrides: list[str] | None = None, limit: int | None = None) -> None:
    """Serve every installed deployment from this process until interrupted (`likeness serve`)."""
    from prefect import serve

    for key, value in LIBRARY_LOGGERS_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the flow-run subprocesses
    ensure_gpu_limit()
    serve(*runner_deployments(settings, profile, overrides), limit=limit)


# --- prefect.yaml ----------------------------------------------------------------------------

K8S_WORKSPACE = "/workspace/likeness"  # on the Kubernetes pools' shared volume

POOLS = {
    "cpu": {"name": "cpu", "job_variables": {"env": {**LIBRARY_LOGGERS_ENV, "CUDA_VISIBLE_DEVICES": ""}}},
    "gpu": {"name": "gpu", "job_variables": {"env": {**LIBRARY_LOGGERS_ENV, "CUDA_VISIBLE_DEVICES": "0"}}},
}


def yaml_deployments(profile: str = "demo-cpu") -> list[dict[str, Any]]:
    """Every deployment (installed or not) as prefect.yaml lists it."""
    rows = []
    for spec in DEPLOYMENTS:
        row: dict[str, Any] = {
            "name": spec.name, "entrypoint": spec.entrypoint, "tags": spec.tags,
            "parameters": {"profile": profile, **spec.parameters}, "work_pool": copy.deepcopy(POOLS[spec.pool]),
        }
        if spec.name == "train":
            row["concurrency_limit"] = 1
        if spec.name == "watch":
            row["schedules"] = [{"interval": int(WatchSettings().interval_minutes * 60)}]
        if spec.name == "pipeline":
            row["triggers"] = [copy.deepcopy(RETRAIN_TRIGGER)]
        if spec.name == "train":
            row["triggers"] = [resume_trigger(spec.name)]
        rows.append(row)
    return rows + [kubernetes_twin(row) for row in rows]


def kubernetes_twin(row: dict[str, Any]) -> dict[str, Any]:
    """The same deployment on a Kubernetes pool (`k8s-gpu` / `k8s-cpu`, deployments/kubernetes/):
    it runs in the worker image, where the project is at /opt/likeness, and its workspace lives on
    the pool's shared volume (/workspace)."""
    twin = copy.deepcopy(row)
    pool = row["work_pool"]["name"]
    twin["name"] = f"{row['name']}-k8s"
    twin["tags"] = ["likeness", f"k8s-{pool}-pool"]
    twin["parameters"]["overrides"] = [f"run.workspace={K8S_WORKSPACE}"]
    env = dict(row["work_pool"]["job_variables"]["env"])
    if pool == "gpu":
        env.pop("CUDA_VISIBLE_DEVICES")  # the pod sees only the GPUs it was given
    twin["work_pool"] = {"name": f"k8s-{pool}", "job_variables": {"env": env}}
    twin["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/likeness"}}]
    twin.pop("triggers", None)  # one retrain trigger (the process pool's): not two pipelines per change
    if row["name"] == "train":
        twin["triggers"] = [resume_trigger(twin["name"])]
    return twin


YAML_HEADER = """\
# Deployments of likeness for work pools: a `cpu` process pool (preprocessing, evaluation, the
# watcher) and a `gpu` process pool (training, the whole pipeline). Written by
# `python -m likeness.deployments.catalog > prefect.yaml`; see docs/operations.md.
#
#   prefect work-pool create cpu --type process
#   prefect work-pool create gpu --type process && prefect work-pool set-concurrency-limit gpu 1
#   prefect concurrency-limit create gpu 1        # the training task's `gpu` tag: one at a time
#   prefect deploy --all                          # from this folder
#   prefect worker start --pool cpu               # anywhere
#   prefect worker start --pool gpu               # on the GPU box (CUDA_VISIBLE_DEVICES below)
#
# The `-k8s` twins run on Kubernetes pools (Job per run, image deployments/kubernetes/Dockerfile):
#   prefect work-pool create k8s-cpu --type kubernetes --base-job-template deployments/kubernetes/cpu-pool.json
#   prefect work-pool create k8s-gpu --type kubernetes --base-job-template deployments/kubernetes/gpu-pool.json
#   prefect worker start --pool k8s-gpu --type kubernetes   # in the cluster; see docs/kubernetes.md
"""


def render_prefect_yaml(profile: str = "demo-cpu") -> str:
    import yaml

    document = {
        "name": "likeness",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        # runs start in the folder `prefect deploy` was run from (the repository, installed with pip -e)
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}],
        "deployments": yaml_deployments(profile),
    }
    return YAML_HEADER + yaml.safe_dump(document, sort_keys=False, width=110)


if __name__ == "__main__":
    print(render_prefect_yaml(), end="")
