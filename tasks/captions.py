"""Prefect task of stage 4: a caption per prepared image (the work: trainer/captions.py)."""

from __future__ import annotations

from prefect import get_run_logger, task

from likeness.tasks.common import StagePolicy, progress
from likeness.trainer.captions import captions_key, captions_stage
from likeness.trainer.content import HashIndex
from likeness.trainer.settings import CaptionerSettings, Concept
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="write-captions", cache_policy=StagePolicy(key_fn=captions_key))
def write_captions(resize: StageResult, concepts: list[Concept], captioner: CaptionerSettings, seed: int,
                   ws: Workspace, device: str = "auto") -> StageResult:
    """`<stem>.txt` beside each prepared image, from the concept's caption source."""
    result = captions_stage(resize, concepts, captioner, seed, ws, HashIndex(ws.hash_index), device, progress("captions"))
    get_run_logger().info(result.summary())
    return result
