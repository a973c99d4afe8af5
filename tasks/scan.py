"""Prefect task of stage 1: scan and validate the concepts' photos (the work: trainer/dataset.py)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from likeness.tasks.common import StagePolicy, progress
from likeness.trainer.content import HashIndex
from likeness.trainer.dataset import scan_key, scan_stage
from likeness.trainer.settings import Concept
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="scan-images", cache_policy=StagePolicy(key_fn=scan_key))
def scan_images(concepts: list[Concept], min_side: int, ws: Workspace, workers: int = 2) -> StageResult:
    """List, hash and decode every photo; errors stop the flow, warnings go to the report."""
    result, report = scan_stage(concepts, min_side, ws, HashIndex(ws.hash_index), progress("scan"), workers)
    create_markdown_artifact(report.markdown(), key="scan-report", description="Dataset problems, found before any heavy work")
    logger = get_run_logger()
    for issue in report.warnings[:20]:
        logger.warning("%s: %s: %s", issue.kind, issue.path, issue.message)
    if len(report.warnings) > 20:
        logger.warning("... %d more warnings in %s", len(report.warnings) - 20, ws.report("scan-report.md"))
    report.raise_for_errors()
    logger.info(result.summary())
    return result
