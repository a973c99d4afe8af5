"""What the stage tasks share: a content cache policy, retries from settings, progress, and the
call that runs a stage (re-running it when a cached result's files changed since).

A stage's cache key comes from the plain `<stage>_key` function beside its work in the same module: the
hash of the upstream table (which lists content hashes), the stage's own settings, the models'
content and a stage version; never mtimes, run ids or where the workspace lies. Results are persisted
in `workspace/prefect/`, so a new process sees them and deleting the workspace clears them; a stage
task returns `ws.portable(result)` (paths relative to the workspace), so a workspace moved or mounted
elsewhere finds its results valid, and `run_stage` hands the caller `ws.local(result)`.

    resized = run_stage(resize_images, settings, ws, scan=scan, resize=settings.resize)
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import Task, get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from prefect.states import Failed

from likeness.errors import BadInputError, debug_enabled
from likeness.settings import Settings
from likeness.stages import PrepareError, Progress, StageResult, outputs_intact
from likeness.terminal import UI_ONLY, report_cleanly
from likeness.workspace import Workspace

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class StagePolicy(CachePolicy):
    """Cache key = `key_fn(**the task inputs it names)`: content, not argument strings."""

    key_fn: Callable[..., str] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if self.key_fn is None:
            return None
        names = inspect.signature(self.key_fn).parameters
        return self.key_fn(**{name: value for name, value in inputs.items() if name in names})


# Failures no retry can fix: the data or the settings (PrepareError, SettingsError and pydantic's
# ValidationError are ValueErrors), or a bug. Everything else (OSError, CUDA out of memory, a
# killed worker's RuntimeError) is retried with backoff.
PERMANENT = (PrepareError, ValueError, TypeError, LookupError, NotImplementedError, AssertionError)


def transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry transient failures (I/O, out of memory), not problems with the data, settings or code."""
    try:
        state.result()
    except PERMANENT as exc:
        _logger().info("not retried (%s): fix the input it names, then run again", type(exc).__name__, extra=UI_ONLY)
        return False
    except Exception:
        return True
    return True


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a run (tests, plain use)
        return logging.getLogger(__name__)


def backoff(retries: int, delay: float) -> list[float]:
    """Retry delays doubling from `delay`: [d, 2d, 4d, ...], one per retry."""
    return [delay * 2**i for i in range(max(retries, 1))]


def workers(settings: Settings) -> int:
    return settings.run.workers or os.cpu_count() or 1


def progress(stage: str) -> Progress:
    """A Prefect log line every 10 % (the terminal shows it too: one progress display, not a bar beside it)."""
    logger, logged = get_run_logger(), [-1]

    def update(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > logged[0]:
            logged[0] = tenth
            logger.info("%s: %d / %d images", stage, done, total)
    return update


def fails_cleanly(flow_fn: F) -> F:
    """For flow bodies (under `@flow`): bad input ends the run Failed with its message, no traceback.

    The state message is the error's own message (the UI shows it as is), Prefect logs no
    traceback for it, and the caller (a parent flow, the CLI) gets the same exception raised again.
    With `--debug` / `LIKENESS_DEBUG=1` the error propagates as any other, traceback and all.
    """
    @functools.wraps(flow_fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        try:
            return flow_fn(*args, **kwargs)
        except BadInputError as exc:
            if debug_enabled():
                raise
            report_cleanly(str(exc))
            return Failed(message=str(exc), data=exc)
    # Prefect builds the parameter model from the signature: resolve the annotations where the flow
    # was written (this module's globals do not know e.g. `StageName`).
    body.__signature__ = inspect.signature(flow_fn, eval_str=True)  # type: ignore[attr-defined]
    body.__annotations__ = {**flow_fn.__annotations__, **typing.get_type_hints(flow_fn)}
    return body  # type: ignore[return-value]


def run_stage(stage_task: Task, settings: Settings, ws: Workspace, /, **inputs: Any) -> StageResult:
    """Run one stage task with the run's retries; redo it if its cached outputs changed on disk."""
    configured = stage_task.with_options(
        retries=settings.run.retries, retry_delay_seconds=backoff(settings.run.retries, settings.run.retry_delay_seconds),
        retry_condition_fn=transient, result_storage=ws.prefect_results)
    state = configured(ws=ws, **inputs, return_state=True)
    result: StageResult = ws.local(state.result())  # stage tasks return `ws.portable(result)`: see Workspace
    if state.name != "Cached":
        return result
    if outputs_intact(result, ws, ws.hashes()):
        return result.as_cached()
    get_run_logger().warning("%s: files written by the cached run changed or vanished; redoing them", result.stage)
    return ws.local(configured.with_options(refresh_cache=True)(ws=ws, **inputs))
