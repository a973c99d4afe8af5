"""Extending a finished run (or shortening one) instead of training it again from step 0.

A backup's fingerprint (`loop.training_fingerprint`) covers what changes the weights of the steps
already done: every training setting, the data and the base model, but not the run's length, which
is `run_length`: `training.epochs` and each part's `stop_training_after` count. Each backup also
records the length of the run that wrote it. A run resumes from the newest backup with its
fingerprint whose steps it would have done the same way (`continues_into`):

- the backup is not past the new end (its epoch <= `training.epochs`);
- every part that stops (`stop_training_after` with unit EPOCH or STEP) trained in the same steps:
  both counts are at or past what the backup had done (`min(old, done) == min(new, done)`); so a
  text encoder's stop can be raised after the run passed it only from a backup taken before it.

The last state of a run is kept as a backup (`backups.keep_final`), so raising `training.epochs`
from 2 to 4 continues from the end of epoch 2 ("extending from epoch 2 to 4"). With the CONSTANT
schedule (warmup included) every step's learning rate depends only on the step, so the result is
bit for bit that of a straight 4-epoch run.

The one rule for schedules that depend on the total step count (LINEAR, COSINE,
COSINE_WITH_RESTARTS): the schedule is **stretched**, never restarted. It is rebuilt over the new
total, and the continued run takes the learning rate the longer run's curve has at the current
step (the LR jumps at the join: after 2 of 4 epochs a COSINE run was near 0, the 4-epoch curve is
at its middle). The steps already done keep the LR of the shorter run, so the result differs from
a straight longer run; the log says so. For a result equal to a straight run, use CONSTANT or
delete the backups (workspace/backups) to start over.

    backup = resumable_backup(ws.backups, fingerprint, settings)   # None: train from step 0
"""

from __future__ import annotations

from typing import Any

from likeness.settings import Settings
from likeness.trainer.backup import Backup, list_backups
from likeness.trainer.fingerprint import run_length, stopping_parts  # noqa: F401  (run_length: re-exported)

# Schedules whose learning rate at a step depends on the run's total step count.
TOTAL_STEP_SCHEDULES = ("LINEAR", "COSINE", "COSINE_WITH_RESTARTS")


def done_count(progress: dict[str, Any], unit: str) -> int:
    """The EPOCH or STEP counts the backup's steps were trained at: steps 0..step-1, or the epochs
    begun (one more than those complete when the backup is in the middle of an epoch)."""
    if unit == "STEP":
        return int(progress["step"])
    return int(progress["epoch"]) + (1 if progress.get("batch", 0) else 0)


def continues_into(progress: dict[str, Any], settings: Settings) -> bool:
    """Whether the run `settings` describes would have done the backup's steps exactly as it did."""
    old = progress.get("length")
    if old is None or int(progress["epoch"]) > settings.training.epochs:
        return False
    for part, new_stop in stopping_parts(settings).items():
        done = done_count(progress, getattr(settings.training, part).stop_training_after_unit)
        old_stop = old["stop"].get(part)
        if old_stop is None or min(old_stop, done) != min(new_stop, done):
            return False
    return True


def resumable_backup(root: Any, fingerprint: str, settings: Settings) -> Backup | None:
    """The newest complete backup with `fingerprint` that continues into this run (see module docstring)."""
    for backup in reversed(list_backups(root, fingerprint)):
        if continues_into(backup.progress, settings):
            return backup
    return None


def describe_continuation(progress: dict[str, Any], settings: Settings, total_steps: int) -> list[str]:
    """What a resume from this backup does, in words: the extension and the schedule's rule."""
    old_epochs = progress["length"]["epochs"]
    new_epochs = settings.training.epochs
    lines = []
    if old_epochs != new_epochs:
        verb = "extending" if new_epochs > old_epochs else "shortening"
        lines.append(f"{verb} from epoch {progress['epoch']} to {new_epochs} (the run before had "
                     f"training.epochs = {old_epochs}; step {progress['step']} of {total_steps})")
    old_total = progress.get("total_steps")
    scheduler = settings.schedule.scheduler
    if old_total is not None and old_total != total_steps and scheduler in TOTAL_STEP_SCHEDULES:
        lines.append(f"note: the {scheduler} learning-rate schedule depends on the total step count: it is stretched "
                     f"from {old_total} to {total_steps} steps (the LR continues on the longer curve from step "
                     f"{progress['step']}), so the result differs from a straight {new_epochs}-epoch run; use "
                     "schedule.scheduler = CONSTANT, or delete the backups to start over, for one that equals it")
    return lines
