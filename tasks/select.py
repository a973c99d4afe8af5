"""Prefect task of the selection: pick, copy out, report (the work: trainer/selection.py).
Artifacts `selection` (the report, plot inline) and `selection-table` (the score table)."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.tasks.common import StagePolicy
from likeness.trainer.content import HashIndex
from likeness.trainer.evaluate import read_eval_table
from likeness.trainer.selection import select_key, select_stage
from likeness.trainer.settings import SelectionSettings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="select-checkpoint", cache_policy=StagePolicy(key_fn=select_key))
def select_checkpoint(scores: StageResult, selection: SelectionSettings, destination: Path, ws: Workspace) -> StageResult:
    """The best checkpoint by the selection rule, copied to the output destination, with its report."""
    result = select_stage(scores, selection, destination, ws, HashIndex(ws.hash_index))
    extra = read_eval_table(result)["extra"]
    plot = Path(extra["plot"])
    inline = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
    create_markdown_artifact(extra["markdown"].replace(f"]({plot.name})", f"]({inline})"), key="selection",
                             description=extra["reason"])
    create_table_artifact(extra["table"], key="selection-table", description="Scores and guards per checkpoint")
    logger = get_run_logger()
    for warning in extra["warnings"]:
        logger.warning(warning)
    logger.info("%s -> %s: %s", extra["chosen"], extra["copied"], extra["reason"])
    return result
