"""Base job templates of the Kubernetes work pools (`k8s-gpu`, `k8s-cpu`) for Prefect's Kubernetes
worker (prefect-kubernetes): the worker's own default template plus what likeness needs.

Added variables: `gpu_count` (the `nvidia.com/gpu` limit; 0 in the cpu pool), `node_selector`,
`tolerations` (default: tolerate the `nvidia.com/gpu` taint in the gpu pool), `workspace_claim`
and `workspace_mount` (the PersistentVolumeClaim holding the workspace, mounted read-write on every
pod, so prepare on a CPU node and training on a GPU node see the same files), and a memory-backed
/dev/shm. The templates in deployments/kubernetes/ are written by this module:

    python -m likeness.deployments.kubernetes_pools deployments/kubernetes [--image REGISTRY/likeness-worker:TAG]
    prefect work-pool create k8s-gpu --type kubernetes --base-job-template deployments/kubernetes/gpu-pool.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

POOL_NAMES = {"gpu": "k8s-gpu", "cpu": "k8s-cpu"}
IMAGE = "likeness-worker:latest"  # built from deployments/kubernetes/Dockerfile; push it where the cluster pulls
WORKSPACE_CLAIM = "likeness-workspace"
WORKSPACE_MOUNT = "/workspace"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def default_template() -> dict[str, Any]:
    """The Kubernetes worker's own default base job template (needs prefect-kubernetes)."""
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def _variables(pool: str) -> dict[str, Any]:
    gpu = pool == "gpu"
    return {
        "gpu_count": {"title": "GPUs", "type": "integer", "minimum": 0, "default": 1 if gpu else 0,
                      "description": "nvidia.com/gpu limit of the pod (needs the NVIDIA device plugin)."},
        "node_selector": {"title": "Node selector", "type": "object", "additionalProperties": {"type": "string"},
                          "default": {},
                          "description": "Labels a node must have, e.g. {\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}."},
        "tolerations": {"title": "Tolerations", "type": "array", "items": {"type": "object"},
                        "default": copy.deepcopy(GPU_TOLERATIONS) if gpu else [],
                        "description": "Pod tolerations (GPU nodes are usually tainted nvidia.com/gpu)."},
        "workspace_claim": {"title": "Workspace volume claim", "type": "string", "default": WORKSPACE_CLAIM,
                            "description": "PersistentVolumeClaim (ReadWriteMany) holding the workspace and the photos."},
        "workspace_mount": {"title": "Workspace mount path", "type": "string", "default": WORKSPACE_MOUNT,
                            "description": "Where the claim is mounted in the pod; run.workspace lives under it."},
    }


def pool_template(pool: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base job template of the `gpu` or `cpu` pool."""
    template = copy.deepcopy(base or default_template())
    properties = template["variables"]["properties"]
    properties.update(_variables(pool))
    properties["image"]["default"] = IMAGE
    properties["env"]["default"] = {"PREFECT_LOGGING_EXTRA_LOGGERS": "diffusers,transformers",
                                    **({} if pool == "gpu" else {"CUDA_VISIBLE_DEVICES": ""})}
    properties["finished_job_ttl"]["default"] = 86400  # finished Jobs go after a day
    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    for key in ("completions", "parallelism"):  # Job fields the default puts in the pod spec, where they are invalid
        if key in pod:
            job[key] = pod.pop(key)
    container = pod["containers"][0]
    if pool == "gpu":
        container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["volumeMounts"] = [{"name": "workspace", "mountPath": "{{ workspace_mount }}"},
                                 {"name": "shm", "mountPath": "/dev/shm"}]
    pod["volumes"] = [{"name": "workspace", "persistentVolumeClaim": {"claimName": "{{ workspace_claim }}"}},
                      {"name": "shm", "emptyDir": {"medium": "Memory"}}]  # torch workers share tensors here
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    return template


def write_templates(folder: Path, image: str = IMAGE) -> list[Path]:
    """Write gpu-pool.json and cpu-pool.json into `folder`, with `image` as the default image."""
    written = []
    for pool in ("gpu", "cpu"):
        template = pool_template(pool)
        template["variables"]["properties"]["image"]["default"] = image
        path = Path(folder) / f"{pool}-pool.json"
        path.write_text(json.dumps(template, indent=2) + "\n")
        written.append(path)
    return written


def main(argv: list[str]) -> None:
    """`python -m likeness.deployments.kubernetes_pools [FOLDER] [--image REGISTRY/likeness-worker:TAG]`"""
    image = argv[argv.index("--image") + 1] if "--image" in argv else IMAGE
    folders = [a for i, a in enumerate(argv) if a != "--image" and (i == 0 or argv[i - 1] != "--image")]
    for path in write_templates(Path(folders[0] if folders else "deployments/kubernetes"), image):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
