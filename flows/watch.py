"""The dataset watcher: retrain when the concept folders changed since the last training, and only then.

Fingerprints the folders (size + mtime find candidates, content hashes confirm: a rename or a touch
is no change) and compares with the dataset of the last successful training, kept in the workspace
(`watch/dataset.json`). On a change it emits one `likeness.dataset.changed` event; the pipeline
deployment's trigger starts a run on it, and the content-cached stages redo only what changed.
Deployed with a schedule from `settings.watch` (see deployments/).

    likeness watch --profile demo-cpu          # one check, from the command line
"""

from __future__ import annotations

from prefect import flow

from likeness.settings import Settings
from likeness.tasks.common import fails_cleanly
from likeness.tasks.watch import announce_change, fingerprint_dataset


@flow(name="watch-dataset", log_prints=True)
@fails_cleanly
def watch_dataset(settings: Settings) -> dict[str, object]:
    """Check the concept folders once; emit `likeness.dataset.changed` if they differ from the last training."""
    check = fingerprint_dataset(settings)
    event = announce_change(settings, check) if check.announce else None
    return {"fingerprint": check.current.digest, "changed": check.changed, "announced": event is not None,
            "hashed": check.current.hashed, "files": len(check.current.files)}
