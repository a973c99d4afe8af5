"""The prepare flow on Prefect: all `Cached` when nothing changed, one changed photo redone alone,
a stage failing half way resumed without redoing finished images, each stage runnable alone."""

import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from likeness.cli import app
from likeness.flows.prepare import prepare, prepare_stage
from likeness.manifest import read_manifest
from likeness.profiles import write_profile
from likeness.stages import MissingStageError
from likeness.tasks import latents as latents_module, masks as masks_module
from likeness.tasks.scan import DatasetError
from likeness.workspace import PREPARE_STAGES, Workspace

pytestmark = pytest.mark.usefixtures("prefect_flows")
TASKS = {"scan-images": "scan", "resize-images": "resize", "compute-masks": "masks", "write-captions": "captions",
         "balance-concepts": "balance", "write-manifest": "manifest", "cache-latents": "latents"}


def task_runs(state, expected: int = 7) -> dict[str, list]:
    """The flow run's task runs by stage (`expected` stages), oldest first, as the Prefect server recorded them.

    Task runs reach the server as events, a moment after the flow returns: wait for them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            settled = all(r.state and r.state.is_final() for r in runs)
            stages = {TASKS[r.name.rsplit("-", 1)[0]] for r in runs}  # a redone stage has two runs: count stages
            if (settled and len(stages) >= expected) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    by_stage: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.created):
        by_stage.setdefault(TASKS[run.name.rsplit("-", 1)[0]], []).append(run)
    return by_stage


def run_prepare(settings):
    state = prepare(settings, return_state=True)
    return state.result(), {stage: [r.state.name for r in runs] for stage, runs in task_runs(state).items()}


def processed(results) -> dict[str, int]:
    return {stage: result.processed for stage, result in results.items()}


def forbid_model_loads(monkeypatch):
    monkeypatch.setattr(masks_module, "load_model", lambda *a: pytest.fail("CLIPSeg was loaded"))
    monkeypatch.setattr(latents_module, "load_encoders", lambda *a, **k: pytest.fail("the VAE was loaded"))


def test_rerun_is_all_cached_and_one_changed_photo_is_redone_alone(prepare_settings, photo, monkeypatch):
    settings = prepare_settings()
    first, states = run_prepare(settings)
    assert states == {stage: ["Completed"] for stage in PREPARE_STAGES}
    assert processed(first) == {"scan": 7, "resize": 7, "masks": 7, "captions": 7, "balance": 2, "manifest": 7, "latents": 7}

    with monkeypatch.context() as patch:
        forbid_model_loads(patch)
        cached, states = run_prepare(settings)
    assert states == {stage: ["Cached"] for stage in PREPARE_STAGES}
    assert all(r.cached and r.processed == 0 for r in cached.values())

    photo(prepare_settings.person / "p1.jpg", 4, quality=95)  # one photo replaced
    changed, states = run_prepare(settings)
    assert states == {**{stage: ["Completed"] for stage in PREPARE_STAGES}, "balance": ["Cached"]}  # counts unchanged
    # captions are fixed text here: nothing to redo for them; every image stage redoes exactly one photo
    assert processed(changed) == {"scan": 1, "resize": 1, "masks": 1, "captions": 0, "balance": 0, "manifest": 1, "latents": 1}
    assert {r.reused for s, r in changed.items() if s in ("resize", "masks", "latents")} == {6}

    photo(prepare_settings.person / "p3.png", 5, size=(70, 70))  # one photo added
    added, _ = run_prepare(settings)
    assert {s: added[s].processed for s in ("resize", "masks", "captions", "latents")} == {"resize": 1, "masks": 1, "captions": 1, "latents": 1}

    Path(prepare_settings.reg / "r2.png").unlink()  # one photo removed
    removed, _ = run_prepare(settings)
    manifest = read_manifest(Workspace.from_settings(settings).manifest, Workspace.from_settings(settings))
    assert "reg/r2" not in set(manifest["id"]) and len(manifest) == 7
    assert not (Workspace.from_settings(settings).prepared / "reg" / "r2.png").exists()
    assert removed["latents"].processed == 0


def test_a_stage_failing_half_way_resumes_without_redoing_finished_images(prepare_settings, monkeypatch):
    settings = prepare_settings(masks={"batch_size": 1})
    real, calls = masks_module.segment, []

    def flaky(images, *args):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("killed half way")
        return real(images, *args)

    monkeypatch.setattr(masks_module, "segment", flaky)
    with pytest.raises(RuntimeError, match="killed half way"):
        prepare(settings)  # no retries: the flow stops in the masks stage
    results, states = run_prepare(settings)  # the re-run finishes: the first mask is not redone
    assert states["masks"] == ["Completed"] and (results["masks"].processed, results["masks"].reused) == (6, 1)
    assert len(calls) == 4  # p0, p1 (failed), then p1 and p2 only

    calls.clear()
    retried = prepare_settings(masks={"batch_size": 1, "threshold": 0.5}, run={"retries": 1})
    results, states = run_prepare(retried)  # fails once, Prefect retries, the retry resumes
    # the retry reuses p0 (done before the failure) and the four maskless reg images (threshold-independent)
    assert states["masks"] == ["Completed"] and (results["masks"].processed, results["masks"].reused) == (2, 5)
    assert len(calls) == 4


def test_dataset_errors_stop_the_flow_before_heavy_work_and_are_not_retried(prepare_settings):
    (prepare_settings.person / "broken.jpg").write_bytes(b"")
    settings = prepare_settings(run={"retries": 3, "retry_delay_seconds": 30})
    state = prepare(settings, return_state=True)
    with pytest.raises(DatasetError, match="broken.jpg"):
        state.result()
    (scan,) = task_runs(state, expected=1)["scan"]
    assert scan.run_count == 1 and scan.state.name == "Failed"
    ws = Workspace.from_settings(settings)
    assert not ws.prepared.exists() and "zero-byte" in ws.report("scan-report.md").read_text()


def test_outputs_deleted_since_a_cached_run_are_redone(prepare_settings):
    settings = prepare_settings()
    run_prepare(settings)
    ws = Workspace.from_settings(settings)
    (ws.prepared / "reg" / "r0.png").unlink()
    shutil.rmtree(ws.latent_cache)
    results, states = run_prepare(settings)
    assert states["resize"] == ["Cached", "Completed"] and results["resize"].processed == 1
    assert states["latents"] == ["Cached", "Completed"] and results["latents"].processed == 7
    assert states["masks"] == ["Cached"]  # the redone image is byte-identical: nothing downstream changes


def test_each_stage_runs_alone_after_the_ones_it_reads(prepare_settings, tmp_path):
    settings = prepare_settings()
    with pytest.raises(MissingStageError, match="stage 'resize'"):
        prepare_stage(settings, "masks")
    profile = write_profile(settings, tmp_path / "profile.toml")
    result = CliRunner().invoke(app, ["stage", "captions", "--profile", str(profile)])
    assert result.exit_code == 2
    assert f"likeness stage resize --profile {profile}" in result.output
    for stage in PREPARE_STAGES:
        assert prepare_stage(settings, stage).total > 0
    assert len(read_manifest(Workspace.from_settings(settings).manifest, Workspace.from_settings(settings))) == 7
    result = CliRunner().invoke(app, ["stage", "latents", "--profile", str(profile)])
    assert result.exit_code == 0 and "latents: cached" in result.output
    assert "unknown stage" in CliRunner().invoke(app, ["stage", "train", "--profile", str(profile)]).output
