"""The result on the run the user started: the chosen checkpoint, why, the overview grid, and links
to every stage run's artifacts, as one `summary` markdown artifact of the entry flow run.

The stage subflows (prepare, train, evaluate, select) each publish their own artifacts (grid,
loss curve, selection, ...); this page gathers them so a user who pressed Run finds the result on
that run, not two subflows down. Links are relative to the UI (`/runs/flow-run/<id>`), so they work
whatever host the UI is served on.

    publish_summary(result)        # inside the entry flow, after the pipeline subflow returned
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image

SUMMARY_KEY = "summary"
# Every artifact key the stages publish; a cached stage publishes nothing new, so the page links the
# latest of each key too (the UI's /artifacts/key/<key> page, with its history).
STAGE_KEYS = ("scan-report", "scan-files", "masks-report", "mask-overlays", "balancing", "loss-curve", "loss-table",
              "grid", "scores", "selection", "selection-table")
GRID_WIDTH = 1024  # px: the inline overview is scaled down to this width (artifacts live in the database)


def inline_image(path: Path, width: int = GRID_WIDTH) -> str:
    """A JPEG data URI of the image, scaled down to `width` px at most."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def summary_markdown(chosen: Path, source: Path, reason: str, overview: Path | None,
                     stages: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
    """The summary page. `stages`: (stage flow name, flow run id, [(artifact key, artifact id)])."""
    lines = ["# Result", "", f"**Chosen checkpoint:** `{chosen}` (from `{source.name}`)", "",
             f"**Why:** {reason}", ""]
    if overview is not None and overview.is_file():
        lines += ["## Overview grid", "", "Columns: the base model, then each checkpoint; rows: the prompts.", "",
                  f"![overview grid]({inline_image(overview)})", ""]
    lines += ["## Stage runs and their artifacts", ""]
    for name, run_id, artifacts in stages:
        links = ", ".join(f"[{key}](/artifacts/artifact/{artifact_id})" for key, artifact_id in artifacts)
        lines.append(f"- [{name}](/runs/flow-run/{run_id}?tab=Artifacts): {links or 'no new artifacts (cached)'}")
    lines += ["", "Latest of each (a cached stage made none this run): "
              + ", ".join(f"[{key}](/artifacts/key/{key})" for key in STAGE_KEYS)]
    return "\n".join(lines) + "\n"


def stage_runs(flow_run_id: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every subflow run under `flow_run_id` (depth first) with its flow name and its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    found: list[tuple[str, str, list[tuple[str, str]]]] = []
    with get_client(sync_client=True) as client:
        todo = [flow_run_id]
        runs: list[Any] = []
        while todo:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[todo.pop(0)])))
            runs += children
            todo += [str(run.id) for run in children]
        flows = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
        for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            found.append((flows[run.flow_id], str(run.id),
                          [(a.key or a.type or "artifact", str(a.id)) for a in artifacts]))
    return found


def publish_summary(chosen: Path, source: Path, reason: str, grids: list[Path]) -> str:
    """Create the `summary` artifact on the current flow run; returns its markdown."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    markdown = summary_markdown(chosen, source, reason, grids[-1] if grids else None, stage_runs(flow_run.id))
    create_markdown_artifact(markdown, key=SUMMARY_KEY, description=f"{chosen.name}: {reason}")
    return markdown
