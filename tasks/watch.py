"""The watcher's tasks: fingerprint the concept folders; announce a change as a Prefect event.

Never cached (a check must look at the folders every time); I/O errors are retried, a missing
folder is not (it names the concept to fix).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from likeness.tasks.common import transient
from likeness.trainer.fingerprint import Check, check_dataset, record_announced
from likeness.trainer.settings import Settings

DATASET_CHANGED = "likeness.dataset.changed"


@task(name="fingerprint-dataset", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=transient)
def fingerprint_dataset(settings: Settings) -> Check:
    check = check_dataset(settings.concepts, settings.run.workspace)
    fp = check.current
    get_run_logger().info("%d files in the concept folders, %d hashed (new size or mtime), fingerprint %s: %s",
                          len(fp.files), fp.hashed, fp.digest[:12],
                          f"changed since the last training ({check.changes.describe()})" if check.changed
                          else "same as the last training")
    return check


@task(name="announce-dataset-change", cache_policy=NO_CACHE)
def announce_change(settings: Settings, check: Check) -> dict[str, Any]:
    """Emit `likeness.dataset.changed` with the fingerprint and the settings the retraining should use."""
    payload = {"fingerprint": check.current.digest, "added": check.changes.added, "removed": check.changes.removed,
               "workspace": str(settings.run.workspace), "settings": settings.model_dump(mode="json")}
    event = emit_event(event=DATASET_CHANGED, payload=payload,
                       resource={"prefect.resource.id": f"likeness.dataset.{settings.run.name}",
                                 "prefect.resource.name": settings.run.name})
    record_announced(settings.run.workspace, check.current.digest)
    get_run_logger().info("emitted %s for %s (event %s)", DATASET_CHANGED, check.current.digest[:12],
                          event.id if event else "not sent: no Prefect API")
    return {"event": str(event.id) if event else None, "fingerprint": check.current.digest}
