"""Prefect tasks of the evaluation: the grid (generation + losses) and the scores (the work:
trainer/evaluate.py and trainer/scores.py). Artifacts `grid` (markdown) and `scores` (table)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.tasks.common import StagePolicy
from likeness.trainer.content import HashIndex
from likeness.trainer.evaluate import grid_key, grid_markdown, grid_stage, read_eval_table
from likeness.trainer.scores import scores_key, scores_stage
from likeness.trainer.settings import Settings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="generate-grid", tags=["gpu"], cache_policy=StagePolicy(key_fn=grid_key))  # holds the GPU slot
def generate_grid(checkpoints: list[str], settings: Settings, ws: Workspace) -> StageResult:
    """Base model + every checkpoint x prompts x seeds (same seeds everywhere), labelled grids, losses."""
    logger = get_run_logger()
    result = grid_stage(checkpoints, settings, ws, HashIndex(ws.hash_index),
                        lambda done, total: logger.info("grid: %d / %d columns done", done, total))
    create_markdown_artifact(grid_markdown(result), key="grid", description="Checkpoints x prompts x seeds")
    logger.info("%s; overview: %s", result.summary(), read_eval_table(result)["extra"]["grids"][-1])
    return result


@task(name="score-checkpoints", cache_policy=StagePolicy(key_fn=scores_key))
def score_checkpoints(grid: StageResult, settings: Settings, ws: Workspace) -> StageResult:
    """Likeness (DINO, CLIP-I), prompt fidelity (CLIP-T) and the losses, one row per checkpoint."""
    result = scores_stage(grid, settings, ws, HashIndex(ws.hash_index))
    rows = [{k: v for k, v in row.items() if k != "path"} for row in read_eval_table(result)["rows"]]
    create_table_artifact(rows, key="scores", description="Scores per checkpoint (base model first)")
    get_run_logger().info(result.summary())
    return result
