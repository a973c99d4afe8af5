"""Prefect tasks of the training stage (the work: trainer/loop.py): `train_model` on the GPU slot,
and `publish_training_report`, the artifacts `loss-curve` (markdown, the PNG inline) and
`loss-table` (the loss every few steps). With `evaluation.during_training` on, the table
artifact `evaluation-during-training` holds one row per in-training evaluation, updated in place
as the run goes (`EvaluationArtifactSink`).

The cache key is the content training reads (manifest, latent cache index, base model) and the
training settings (`fingerprint.train_key`): a re-run with nothing changed is `Cached` and loads no model.
A retry (or a re-run after a crash) resumes from the newest matching backup by itself; a re-run
with more `training.epochs` continues the finished run from its last backup (trainer/extend.py).
"""

from __future__ import annotations

import base64
import csv
import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.settings import Settings
from likeness.tasks.common import StagePolicy
from likeness.trainer.fingerprint import train_key, training_fingerprint
from likeness.trainer.result import TrainResult
from likeness.workspace import Workspace

TABLE_ROWS = 200  # the table artifact shows at most about this many steps


class EvaluationArtifactSink:
    """A metrics sink: each in-training evaluation (the `eval/...` scalars) becomes a row of one table
    artifact, created at the first evaluation and then updated in place."""

    key = "evaluation-during-training"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.artifact_id = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        evaluation = {name[5:]: round(value, 5) for name, value in values.items() if name.startswith("eval/")}
        if not evaluation:
            return
        self.rows.append({"step": step, **evaluation})
        if self.artifact_id is None:
            self.artifact_id = create_table_artifact(self.rows, key=self.key,
                                                     description="Face identity and prompt fidelity during training")
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            client.update_artifact(self.artifact_id, ArtifactUpdate(data=json.dumps(self.rows)))

    def image(self, step: int, tag: str, image: Any) -> None:
        pass

    def close(self) -> None:
        pass


@task(name="train-model", tags=["gpu"], cache_policy=StagePolicy(key_fn=train_key))
def train_model(settings: Settings, ws: Workspace) -> TrainResult:
    """Fine-tune the base model on the prepared dataset: samples, checkpoints, backups, loss reports."""
    from likeness.trainer.extend import resumable_backup  # the trainer's imports (torch, diffusers): not on a cached run
    from likeness.trainer.loop import train
    from likeness.trainer.tensorboard import sinks_from_settings

    backup = resumable_backup(ws.backups, training_fingerprint(settings, ws), settings)  # TensorBoard drops steps after it
    sinks = sinks_from_settings(settings, ws, start_step=backup.step + 1 if backup else None)
    if settings.evaluation.during_training.enabled:
        sinks = [*sinks, EvaluationArtifactSink()]
    result = train(settings, log=get_run_logger().info, sinks=sinks)
    get_run_logger().info(result.summary())
    return ws.portable(result)  # paths relative: a moved workspace finds this result valid


@task(name="publish-training-report")
def publish_training_report(result: TrainResult) -> None:
    with open(result.loss_table, newline="") as f:
        rows = list(csv.DictReader(f))
    every = max(1, len(rows) // TABLE_ROWS)
    create_table_artifact(rows[::every] + (rows[-1:] if (len(rows) - 1) % every else []), key="loss-table",
                          description=f"Training loss (every {every} step(s)), {result.loss_table}")
    curve = "(no steps)"
    if result.loss_curve.is_file():
        inline = base64.b64encode(result.loss_curve.read_bytes()).decode("ascii")
        curve = f"![loss curve](data:image/png;base64,{inline})"
    create_markdown_artifact(f"# Training loss\n\n{curve}\n\n`{result.loss_curve}`\n\n{result.summary()}\n",
                             key="loss-curve", description="Loss per step and its moving average")
