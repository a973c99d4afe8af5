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
from typing import Annotated, Any, Literal

from prefect import State, flow, get_run_logger
from prefect.states import Completed
from pydantic import Field

from likeness.deployments.form import apply_changes, changed_fields, describe_changes, form_parameters, profile_choices
from likeness.deployments.summary import publish_summary
from likeness.profiles import apply_override, load_profile, profile_data, validate_settings
from likeness.settings import Settings
from likeness.stages import run_profile
from likeness.tasks.common import fails_cleanly
from likeness.tasks.watch import DATASET_CHANGED, fingerprint_concepts, record_trained

StageName = Literal["generate", "scan", "resize", "masks", "captions", "balance", "manifest", "latents"]
LIBRARY_LOGGERS = ("diffusers", "transformers")

# Stage flows by name: (module, flow function). Those whose module is not there yet are skipped.
STAGE_FLOWS = {
    "prepare": ("likeness.flows.prepare", "prepare"),
    "train": ("likeness.flows.train", "train"),
    "evaluate": ("likeness.flows.evaluate", "evaluate"),
    "select": ("likeness.flows.evaluate", "select"),
    "compare-faces": ("likeness.flows.evaluate", "compare_faces"),
    "extract-lora": ("likeness.flows.lora", "extract_lora"),
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
                     overrides: list[str] | None = None, opened: dict[str, Any] | None = None) -> Settings:
    """The run's settings by the form's rule (deployments/form.py): the profile alone when the form
    is empty; the form as submitted when the profile is the one it opened on; another profile plus the
    fields changed in the form otherwise. Overrides go on top. `opened`: the deployment's defaults.

    Raises SettingsError naming each bad field (the run's log shows it; no retry helps).
    """
    overrides = list(overrides or [])
    if settings is None:
        if not profile:
            raise ValueError("give a profile name (e.g. demo-cpu) or fill in the settings form")
        return load_profile(profile, overrides)
    data = settings.model_dump(mode="json") if isinstance(settings, Settings) else dict(settings)
    source = "the settings form"
    if _other_profile(profile, opened):
        data = apply_changes(profile_data(profile), changed_fields(opened["settings"], data))
        source = f"profile {profile!r} with the changes made in the settings form"
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_settings(data, source=source, overrides=overrides)


def settings_source(profile: str | None, settings: Settings | dict[str, Any] | None,
                    opened: dict[str, Any] | None = None, triggered: str | None = None) -> str:
    """Where the run's settings came from, in words, for the run's log. `triggered`: the name of the
    automation that created the run (the watcher's retrain trigger, the crash-resume trigger)."""
    if triggered and "dataset changed" in triggered:
        return f"the {DATASET_CHANGED} event of the dataset watcher (its settings)"
    if triggered:
        return f"the automation {triggered!r} (the parameters it passed)"
    if settings is None:
        return f"profile {profile!r}"
    data = settings.model_dump(mode="json") if isinstance(settings, Settings) else dict(settings)
    if not opened or not isinstance(opened.get("settings"), dict):
        return "the settings parameter"
    changes = describe_changes(changed_fields(opened["settings"], data)) or "nothing"
    if _other_profile(profile, opened):
        return f"profile {profile!r} with the changes made in the settings form: {changes}"
    return f"the settings form (opened on profile {opened.get('profile')!r}), changed: {changes}"


def _other_profile(profile: str | None, opened: dict[str, Any] | None) -> bool:
    return bool(opened and isinstance(opened.get("settings"), dict) and profile
                and profile != opened.get("profile"))


def deployment_defaults() -> dict[str, Any]:
    """The parameters the form opened on (this run's deployment's defaults); {} outside a deployment."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    try:  # not `deployment.parameters`: that is this run's parameters, not the deployment's defaults
        if not deployment.id:
            return {}
        with get_client(sync_client=True) as client:
            return dict(client.read_deployment(deployment.id).parameters or {})
    except Exception:  # noqa: BLE001 - no API: the form rule falls back to "as given"
        return {}


def started_by_automation() -> str | None:
    """The name of the automation (e.g. the watcher's retrain trigger) that created this flow run, if one did."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    try:
        with get_client(sync_client=True) as client:
            key = client.read_flow_run(flow_run.id).idempotency_key or ""
            if not key.startswith("automation "):
                return None
            automation = client.read_automation(UUID(key.split(",")[0].removeprefix("automation ").strip()))
            return automation.name if automation else "an automation"
    except Exception:  # noqa: BLE001 - no API: say nothing rather than fail the run
        return None


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
    opened = deployment_defaults()
    resolved = resolve_settings(profile, settings, overrides, opened)
    source = settings_source(profile, settings, opened, triggered=started_by_automation())
    get_run_logger().info("settings from %s%s; workspace %s", source,
                          f"; overrides {', '.join(overrides)}" if overrides else "", resolved.run.workspace)
    return resolved


def _run_stage(name: str, profile: str | None, settings: Settings | None, overrides: list[str] | None) -> Any:
    """Resolve the run's settings, then run the stage flow `name` with hints naming the profile."""
    resolved = _start(profile, settings, overrides)
    with run_profile(profile):
        return stage_flow(name)(resolved)


# The form's parameters: a profile dropdown, the settings (opened on the served profile), overrides.
# Their texts in the UI come from the `Args:` block `form_parameters` adds to each flow's docstring.
ProfileParameter = Annotated[str, Field(json_schema_extra={"enum": profile_choices()})]
SettingsParameter = Settings | None
OverridesParameter = list[str] | None


@flow(name="likeness-pipeline", log_prints=True)
@fails_cleanly
@form_parameters
def run_pipeline(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
                 overrides: OverridesParameter = None) -> State:
    """The whole chain: prepare -> train -> evaluate -> select. Remembers the dataset it trained on.

    The run ends with the chosen checkpoint and the reason as its state message, and a `summary`
    artifact (the overview grid, links to every stage run's artifacts)."""
    resolved = _start(profile, settings, overrides)
    dataset = fingerprint_concepts(resolved.concepts)
    with run_profile(profile):
        result = stage_flow("pipeline")(resolved)
    record_trained(resolved.run.workspace, dataset)  # what the watcher compares with from now on
    get_run_logger().info("dataset %s recorded as the last trained one", dataset.digest[:12])
    publish_summary(result.chosen, result.source, result.reason, result.grids)
    return Completed(message=f"{result.chosen}: {result.reason}", data=result)


@flow(name="likeness-prepare", log_prints=True)
@fails_cleanly
@form_parameters
def run_prepare(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
                overrides: OverridesParameter = None) -> None:
    """Prepare the dataset: scan, resize, masks, captions, balancing, manifest, latent cache."""
    _run_stage("prepare", profile, settings, overrides)


@flow(name="likeness-stage", log_prints=True)
@fails_cleanly
@form_parameters
def run_stage(stage: StageName = "scan", profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
              overrides: OverridesParameter = None) -> None:
    """One prepare stage alone, on what the earlier stages left in the workspace.

    Args:
        stage: The prepare stage to run.
    """
    from likeness.flows.prepare import prepare_stage

    resolved = _start(profile, settings, overrides)
    with run_profile(profile):
        prepare_stage(resolved, stage)


class CrashedTooOftenError(RuntimeError):
    """A training that crashed `run.crash_resumes` times in a row is not started again by itself."""


@flow(name="likeness-train", log_prints=True)
@fails_cleanly
@form_parameters
def run_train(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
              overrides: OverridesParameter = None, resumes: int = 0) -> None:
    """Train on the prepared dataset (holds the `gpu` concurrency slot). Remembers the dataset it trained on.

    Args:
        resumes: Set by the crash-resume automation: restarts in a row after a crash (leave 0).
    """
    resolved = _start(profile, settings, overrides)
    check_resumes(resumes, resolved.run.crash_resumes)
    dataset = fingerprint_concepts(resolved.concepts)
    with run_profile(profile):
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
@fails_cleanly
@form_parameters
def run_evaluate(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
                 overrides: OverridesParameter = None) -> None:
    """Evaluate the saved checkpoints: the X/Y grid and the scores."""
    _run_stage("evaluate", profile, settings, overrides)


@flow(name="likeness-select", log_prints=True)
@fails_cleanly
@form_parameters
def run_select(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
               overrides: OverridesParameter = None) -> None:
    """Select the best checkpoint from the evaluation scores and copy it to the output."""
    _run_stage("select", profile, settings, overrides)


@flow(name="likeness-compare-faces", log_prints=True)
@fails_cleanly
def run_compare_faces(reference: str, images: list[str], output: str | None = None, profile: str | None = "demo-cpu",
                      settings: Settings | None = None, overrides: list[str] | None = None) -> None:
    """Score any images against the person's photos by face identity: a table and a contact sheet.

    Args:
        reference: The folder of the person's photos.
        images: Image files or folders to score (our samples, A1111 or ComfyUI outputs).
        output: Where faces.csv and faces.jpg go; default: the workspace's faces folder.
        profile: A profile name or TOML path (for the face model settings and the workspace).
        settings: Every setting, as a form; when given, the profile is ignored.
        overrides: `key=value` changes on top.
    """
    stage_flow("compare-faces")(_start(profile, settings, overrides), reference, images, output)


@flow(name="likeness-extract-lora", log_prints=True)
@fails_cleanly
@form_parameters
def run_extract_lora(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
                     overrides: OverridesParameter = None) -> None:
    """Extract a LoRA (settings.lora) from the selected checkpoint, for use on stylized models."""
    _run_stage("extract-lora", profile, settings, overrides)


@flow(name="likeness-watch", log_prints=True)
@fails_cleanly
@form_parameters
def run_watch(profile: ProfileParameter = "demo-cpu", settings: SettingsParameter = None,
              overrides: OverridesParameter = None) -> None:
    """Fingerprint the concept folders; announce `likeness.dataset.changed` when they differ from the last training."""
    _run_stage("watch", profile, settings, overrides)
