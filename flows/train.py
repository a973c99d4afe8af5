"""The train flow: the prepared dataset (manifest + latent cache) -> checkpoints, samples, loss reports.

Reads only what `prepare` left in the workspace; a missing stage output is an error naming the
stage and the command that makes it. The training task holds the `gpu` concurrency slot (tag),
is cached by content (a re-run with nothing changed does nothing) and retried per
`settings.run.retries`, each retry resuming from the last backup.
After a successful training the dataset it trained on is recorded for the watcher
(`tasks/watch.py`), however the training was started (`likeness train`, `run`, `demo`, a deployment).

    likeness train --profile demo-cpu
    python -m likeness.flows.train PROFILE [key=value ...]
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from likeness.settings import Settings
from likeness.tasks.common import fails_cleanly, transient
from likeness.tasks.train import publish_training_report, train_model
from likeness.tasks.watch import dataset_to_train, record_trained_dataset
from likeness.trainer.fingerprint import check_prepared
from likeness.trainer.result import TrainResult
from likeness.workspace import Workspace


@flow(name="train", log_prints=True)
@fails_cleanly
def train(settings: Settings) -> TrainResult:
    """Fine-tune on the prepared dataset; publish the loss curve and table."""
    ws = Workspace.from_settings(settings)
    check_prepared(ws)
    dataset = dataset_to_train(settings.concepts, settings.run.workspace)
    task = train_model.with_options(retries=settings.run.retries, retry_delay_seconds=settings.run.retry_delay_seconds,
                                    retry_condition_fn=transient, result_storage=ws.prefect_results)
    state = task(settings=settings, ws=ws, return_state=True)
    result: TrainResult = ws.local(state.result())
    if state.name == "Cached" and not all(c.path.exists() for c in result.checkpoints):
        get_run_logger().warning("train: checkpoints of the cached run vanished; training again")
        result = ws.local(task.with_options(refresh_cache=True)(settings=settings, ws=ws))
    publish_training_report(result)
    record_trained_dataset(settings, dataset)  # every way of training tells the watcher what it trained on
    return result


if __name__ == "__main__":
    from likeness.profiles import load_profile

    print(train(load_profile(sys.argv[1] if len(sys.argv) > 1 else "demo-cpu", sys.argv[2:])).summary())
