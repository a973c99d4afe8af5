"""Prefect task of stage 3: head masks with CLIPSeg (the work: trainer/masks.py)."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from likeness.tasks.common import StagePolicy, progress
from likeness.trainer.content import HashIndex
from likeness.trainer.masks import masks_key, masks_stage
from likeness.trainer.settings import Concept, MaskSettings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="compute-masks", cache_policy=StagePolicy(key_fn=masks_key))
def compute_masks(resize: StageResult, masks: MaskSettings, concepts: list[Concept], ws: Workspace,
                  device: str = "auto") -> StageResult:
    """`<stem>-masklabel.png` beside each prepared image of a concept with masks; flags odd masks."""
    result = masks_stage(resize, masks, concepts, ws, HashIndex(ws.hash_index), device, progress("masks"))
    extra = json.loads(result.table.read_text())["extra"]
    create_markdown_artifact(extra["report"], key="masks-report", description="Masks that look empty or full")
    logger = get_run_logger()
    if extra["flagged"]:
        logger.warning("%d mask(s) look empty or cover almost everything: see %s", extra["flagged"], ws.report("masks-report.md"))
    logger.info(result.summary())
    return result
