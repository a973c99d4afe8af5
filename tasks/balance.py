"""Prefect task of stage 5: resolve balancing, count steps, estimate the duration (trainer/balancing.py)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from likeness.tasks.common import StagePolicy
from likeness.trainer.balancing import balance_key, balance_stage
from likeness.trainer.content import HashIndex
from likeness.trainer.settings import Concept, TrainingSettings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="balance-concepts", cache_policy=StagePolicy(key_fn=balance_key))
def balance_concepts(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace) -> StageResult:
    """Balancing per concept (`auto` resolved), samples and steps per epoch, total steps, duration."""
    result, plan = balance_stage(resize, concepts, training, ws, HashIndex(ws.hash_index))
    create_table_artifact(plan.rows(), key="balancing", description=plan.summary())
    get_run_logger().info("balancing:\n%s", plan.markdown())
    return result
