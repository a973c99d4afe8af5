"""Entry flows of the deployments: a profile name OR a settings form, resolved, then the stage flow.

The stage flows (`flows/prepare.py`, `flows/train.py`, ...) take one validated `Settings`. A user
in the Prefect UI either fills the settings form (the `Settings` model rendered with its
descriptions, bounds and choices) or just names a profile, with optional `key=value` overrides as
on the command line. These small flows turn that into `Settings` and call the stage flow as a
subflow, so every stage's task logs appear under the run in the UI.

    python -c "from likeness.deployments.entry import run_prepare; run_prepare(profile='demo-cpu')"
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

from prefect import flow, get_run_logger

from likeness.profiles import apply_override, load_profile, validate_settings
from likeness.settings import Settings
from likeness.tasks.watch import fingerprint_concepts, record_trained

StageName = Literal["scan", "resize", "masks", "captions", "balance", "manifest", "latents"]
LIBRARY_LOGGERS = ("diffusers", "transformers")

# Stage flows by name: (module, flow function). Those whose module is not there yet are skipped.
STAGE_FLOWS = {
    "prepare": ("likeness.flows.prepare", "prepare"),
    "train": ("likeness.flows.train", "train"),
    "evaluate": ("likeness.flows.evaluate", "evaluate"),
    "select": ("likeness.flows.evaluate", "select"),
    "pipeline": ("likeness.flows.pipeline", "pipeline"),
    "watch": ("likeness.flows.watch", "watch_dataset"),
}


class StageUnavailableError(RuntimeError):
    """A deployment names a stage flow whose module is not installed in this version."""


def stage_flow(name: str) -> Any:
    """The stage flow `name` (see STAGE_FLOWS), imported on demand."""
    module_name, attribute = STAGE_FLOWS[name]
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise StageUnavailableError(
            f"stage {name!r} is not available: {module_name} is not installed in this version of likeness; "
            "update likeness (pip install -e .) or pick another deployment") from None


def resolve_settings(profile: str | None, settings: Settings | dict[str, Any] | None,
                     overrides: list[str] | None = None) -> Settings:
    """The run's settings: the form if filled in, else the named profile; overrides on top.

    Raises SettingsError naming each bad field (the run's log shows it; no retry helps).
    """
    overrides = list(overrides or [])
    if settings is None:
        if not profile:
            raise ValueError("give a profile name (e.g. demo-cpu) or fill in the settings form")
        return load_profile(profile, overrides)
    data = settings.model_dump(mode="json") if isinstance(settings, Settings) else dict(settings)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_settings(data, source="the settings parameter")


def route_library_logs() -> None:
    """Send diffusers' and transformers' log records to the Prefect API too, so they show under the run.

    `PREFECT_LOGGING_EXTRA_LOGGERS` does this when it is set before Prefect starts (`likeness serve`
    and prefect.yaml set it); this covers a process that started without it.
    """
    api_handlers = logging.getLogger("prefect.extra").handlers
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in api_handlers:
            if handler not in library.handlers:
                library.addHandler(handler)


def _start(profile: str | None, settings: Settings | None, overrides: list[str] | None) -> Settings:
    route_library_logs()
    resolved = resolve_settings(profile, settings, overrides)
    source = "the settings form" if settings is not None else f"profile {profile!r}"
    get_run_logger().info("settings from %s%s; workspace %s", source,
                          f" with {', '.join(overrides)}" if overrides else "", resolved.run.workspace)
    return resolved


# Parameter descriptions for the UI come from each flow's `Args:` block.


@flow(name="likeness-pipeline", log_prints=True)
def run_pipeline(profile: str | None = "demo-cpu", settings: Settings | None = None,
                 overrides: list[str] | None = None) -> None:
    """The whole chain: prepare -> train -> evaluate -> select. Remembers the dataset it trained on.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top, e.g. `training.epochs=3`.
    """
    resolved = _start(profile, settings, overrides)
    dataset = fingerprint_concepts(resolved.concepts)
    stage_flow("pipeline")(resolved)
    record_trained(resolved.run.workspace, dataset)  # what the watcher compares with from now on
    get_run_logger().info("dataset %s recorded as the last trained one", dataset.digest[:12])


@flow(name="likeness-prepare", log_prints=True)
def run_prepare(profile: str | None = "demo-cpu", settings: Settings | None = None,
                overrides: list[str] | None = None) -> None:
    """Prepare the dataset: scan, resize, masks, captions, balancing, manifest, latent cache.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top, e.g. `masks.threshold=0.4`.
    """
    stage_flow("prepare")(_start(profile, settings, overrides))


@flow(name="likeness-stage", log_prints=True)
def run_stage(stage: StageName = "scan", profile: str | None = "demo-cpu", settings: Settings | None = None,
              overrides: list[str] | None = None) -> None:
    """One prepare stage alone, on what the earlier stages left in the workspace.

    Args:
        stage: The prepare stage to run.
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top.
    """
    from likeness.flows.prepare import prepare_stage

    prepare_stage(_start(profile, settings, overrides), stage)


class CrashedTooOftenError(RuntimeError):
    """A training that crashed `run.crash_resumes` times in a row is not started again by itself."""


@flow(name="likeness-train", log_prints=True)
def run_train(profile: str | None = "demo-cpu", settings: Settings | None = None,
              overrides: list[str] | None = None, resumes: int = 0) -> None:
    """Train on the prepared dataset (holds the `gpu` concurrency slot). Remembers the dataset it trained on.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top, e.g. `training.epochs=3`.
        resumes: Set by the crash-resume automation: restarts in a row after a crash (leave 0).
    """
    resolved = _start(profile, settings, overrides)
    check_resumes(resumes, resolved.run.crash_resumes)
    dataset = fingerprint_concepts(resolved.concepts)
    stage_flow("train")(resolved)
    record_trained(resolved.run.workspace, dataset)


def check_resumes(resumes: int, limit: int) -> None:
    """Log a restart after a crash; refuse one past `limit` (the crash-resume automation's bound)."""
    if resumes > limit:
        raise CrashedTooOftenError(
            f"training crashed {resumes} times in a row (run.crash_resumes = {limit}): not started again by itself. "
            "Read the crashed runs' logs (killed by the out-of-memory killer? a lost node?), fix the cause, "
            "then run the train deployment again: it resumes from the last backup")
    if resumes:
        get_run_logger().warning("started again after a crash (%d of at most %d): training resumes from its "
                                 "last backup", resumes, limit)


@flow(name="likeness-evaluate", log_prints=True)
def run_evaluate(profile: str | None = "demo-cpu", settings: Settings | None = None,
                 overrides: list[str] | None = None) -> None:
    """Evaluate the saved checkpoints: the X/Y grid and the scores.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top.
    """
    stage_flow("evaluate")(_start(profile, settings, overrides))


@flow(name="likeness-select", log_prints=True)
def run_select(profile: str | None = "demo-cpu", settings: Settings | None = None,
               overrides: list[str] | None = None) -> None:
    """Select the best checkpoint from the evaluation scores and copy it to the output.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top.
    """
    stage_flow("select")(_start(profile, settings, overrides))


@flow(name="likeness-watch", log_prints=True)
def run_watch(profile: str | None = "demo-cpu", settings: Settings | None = None,
              overrides: list[str] | None = None) -> None:
    """Fingerprint the concept folders; announce `likeness.dataset.changed` when they differ from the last training.

    Args:
        profile: A profile name (`likeness profiles`) or TOML path; used when the settings form is empty.
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top.
    """
    stage_flow("watch")(_start(profile, settings, overrides))
