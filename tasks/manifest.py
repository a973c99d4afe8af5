"""Prefect task of stage 6: join the stages into the validated manifest (the work: likeness/manifest.py)."""

from __future__ import annotations

from prefect import get_run_logger, task

from likeness.manifest import manifest_key, manifest_stage
from likeness.settings import Concept
from likeness.stages import StageResult
from likeness.tasks.common import StagePolicy
from likeness.workspace import Workspace


@task(name="write-manifest", cache_policy=StagePolicy(key_fn=manifest_key))
def write_manifest(resize: StageResult, masks: StageResult, captions: StageResult, balance: StageResult,
                   concepts: list[Concept], ws: Workspace) -> StageResult:
    """`manifest.csv`, validated by its pandera schema; files of removed photos are deleted."""
    result = manifest_stage(resize, masks, captions, balance, concepts, ws, ws.hashes())
    get_run_logger().info("manifest: %d rows changed, %d unchanged (%s)", result.processed, result.reused, ws.manifest)
    return ws.portable(result)
