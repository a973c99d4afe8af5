"""Prefect task of stage 2: fit and pad every photo to the training resolution (trainer/resize.py)."""

from __future__ import annotations

from prefect import get_run_logger, task

from likeness.tasks.common import StagePolicy, progress
from likeness.trainer.content import HashIndex
from likeness.trainer.resize import resize_key, resize_stage
from likeness.trainer.settings import ResizeSettings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="resize-images", cache_policy=StagePolicy(key_fn=resize_key))
def resize_images(scan: StageResult, resize: ResizeSettings, ws: Workspace, workers: int = 2) -> StageResult:
    """Prepared RGB images in the workspace; only photos whose content changed are redone."""
    result = resize_stage(scan, resize, ws, HashIndex(ws.hash_index), progress("resize"), workers)
    get_run_logger().info(result.summary())
    return result
