"""Kubernetes work pools without a cluster: the pool templates pass Prefect's own checks, a Job the
worker renders from them is valid Kubernetes (kubernetes client models, strictly: no field the
API does not know), prefect.yaml's k8s deployments fit the templates, and the Dockerfile is linted
(parsed with dockerfile-parse, checked against the usual rules: hadolint is not installable here)."""

import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect_kubernetes", reason="the 'kubernetes' extra: pip install -e .[kubernetes]")

from dockerfile_parse import DockerfileParser  # noqa: E402
from kubernetes_asyncio.client import ApiClient  # noqa: E402
from prefect.client.schemas.objects import FlowRun  # noqa: E402
from prefect.server.schemas.actions import validate_base_job_template  # noqa: E402
from prefect.utilities.schema_tools import validate  # noqa: E402
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration  # noqa: E402

from likeness.deployments import catalog, kubernetes_pools  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "deployments" / "kubernetes"


def template(pool):
    return json.loads((FOLDER / f"{pool}-pool.json").read_text())


def render(base, values):
    """The Job manifest the Kubernetes worker would submit for a flow run with these job variables."""
    async def go():
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(base, values, client=object())
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="likeness-train"))
        return config.job_manifest
    return asyncio.run(go())


def as_kubernetes(manifest, kind="V1Job"):
    """Deserialize into the client's model and back: what the model does not know is dropped."""
    class Response:
        data = json.dumps(manifest)

    async def go():
        async with ApiClient() as api:
            return api.sanitize_for_serialization(api.deserialize(Response(), kind))
    return asyncio.run(go())


def unknown_fields(sent, kept, path=""):
    if isinstance(sent, dict):
        return [f"{path}.{k}" for k in sent if k not in kept] + [
            u for k in sent if k in kept for u in unknown_fields(sent[k], kept[k], f"{path}.{k}")]
    if isinstance(sent, list):
        return [u for i, (a, b) in enumerate(zip(sent, kept)) for u in unknown_fields(a, b, f"{path}[{i}]")]
    return []


def test_templates_are_the_generated_ones_and_keep_every_worker_variable():
    default = kubernetes_pools.default_template()
    for pool in ("gpu", "cpu"):
        assert template(pool) == kubernetes_pools.pool_template(pool), \
            "stale: python -m likeness.deployments.kubernetes_pools deployments/kubernetes"
        validate_base_job_template(template(pool))  # what the server checks on `work-pool create`
        assert set(default["variables"]["properties"]) <= set(template(pool)["variables"]["properties"])


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_a_rendered_job_is_valid_kubernetes_with_gpus_volume_and_scheduling(pool):
    values = {"image": "registry.example/likeness-worker:0.1.0", "node_selector": {"pool": "a100"},
              "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
              **({"gpu_count": 2} if pool == "gpu" else {})}
    base = template(pool)
    validate(values, base["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    manifest = render(base, values)
    kept = as_kubernetes(manifest)
    assert not unknown_fields(manifest, kept)
    assert kept["kind"] == "Job" and kept["spec"]["backoffLimit"] == 0
    pod = kept["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == values["image"] and container["args"] == ["prefect", "flow-run", "execute"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == values["tolerations"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "likeness-workspace"}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    limits = container["resources"].get("limits", {})
    assert str(limits.get("nvidia.com/gpu")) == ("2" if pool == "gpu" else "None")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "diffusers,transformers"


def test_gpu_pool_defaults_ask_for_one_gpu_and_tolerate_the_gpu_taint():
    pod = render(template("gpu"), {})["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_prefect_yaml_k8s_deployments_fit_their_pool():
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    k8s = [d for d in document["deployments"] if d["work_pool"]["name"] in kubernetes_pools.POOL_NAMES.values()]
    assert {d["name"] for d in k8s} == {f"{spec.name}-k8s" for spec in catalog.DEPLOYMENTS}
    for row in k8s:
        pool = "gpu" if row["work_pool"]["name"] == "k8s-gpu" else "cpu"
        validate(row["work_pool"]["job_variables"], template(pool)["variables"], raise_on_error=True,
                 preprocess=True, ignore_required=True)
        assert row["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/likeness"}}]
    assert next(d for d in k8s if d["name"] == "train-k8s")["work_pool"]["name"] == "k8s-gpu"


def test_dockerfile_lint():
    parser = DockerfileParser(path=str(FOLDER / "Dockerfile"))
    steps = [(s["instruction"], s["value"]) for s in parser.structure if s["instruction"] != "COMMENT"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", parser.baseimage)  # pinned CUDA
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"TORCH_VERSION={torch_pin}" in [v for i, v in steps if i == "ARG"]  # the torch `make` installs
    runs = [v for i, v in steps if i == "RUN"]
    for run in runs:
        if "apt-get install" in run:  # hadolint DL3009 / DL3015 / DL3014
            assert "apt-get update" in run and "--no-install-recommends" in run and " -y" in run
            assert "rm -rf /var/lib/apt/lists/*" in run
        if "pip install" in run:  # DL3042
            assert "--no-cache-dir" in run
    assert any('pip install --no-cache-dir ".[kubernetes]"' in run for run in runs)
    assert "kubernetes" in project["project"]["optional-dependencies"]
    for source in (v.split()[:-1] for i, v in steps if i == "COPY"):  # every COPY source exists
        assert all((ROOT / s).exists() for s in source), source
    copied = {v.split()[0] for i, v in steps if i == "COPY"}
    assert {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()} <= copied  # all packages
    users = [v for i, v in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")  # DL3002: not root
    entrypoint = next(v for i, v in steps if i == "ENTRYPOINT")
    assert json.loads(entrypoint)[0] == "/usr/bin/tini"  # exec form, signals reach the flow run
    assert not any(i == "ADD" for i, _ in steps)  # DL3020: COPY, not ADD
