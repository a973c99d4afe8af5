"""A relocatable workspace: records store paths relative to the workspace or a concept folder, so a
prepared and trained workspace copied elsewhere (with its photos) is all `Cached` and picks the same
checkpoint, and nothing in it is recomputed."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from likeness.workspace import StoredPath, UnknownRootError, Workspace


# --- the helper pair -------------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws", (("person", tmp_path / "photos" / "person"), ("reg", tmp_path / "photos" / "reg")))


def test_paths_inside_the_workspace_and_concept_folders_are_stored_relative(ws, tmp_path):
    assert ws.relative(ws.prepared_image("person", "p0")) == "{workspace}/prepared/person/p0.png"
    assert ws.relative(ws.root) == "{workspace}"
    assert ws.relative(tmp_path / "photos" / "person" / "sub" / "p0.jpg") == "{concept:person}/sub/p0.jpg"
    assert ws.relative(tmp_path / "photos" / "reg" / "r0.png") == "{concept:reg}/r0.png"
    outside = tmp_path / "models" / "base.safetensors"
    assert ws.relative(outside) == str(outside)  # outside both: absolute, as it was
    assert ws.relative(tmp_path / "photos" / "personal.jpg") == str(tmp_path / "photos" / "personal.jpg")  # not a prefix match


def test_stored_paths_read_back_where_the_roots_lie_now(ws, tmp_path):
    moved = Workspace(tmp_path / "elsewhere" / "ws", (("person", tmp_path / "elsewhere" / "me"),))
    for path in (ws.manifest, ws.latent_cache / "k.safetensors", tmp_path / "photos" / "person" / "p0.jpg"):
        assert ws.absolute(ws.relative(path)) == path
    assert moved.absolute(ws.relative(ws.manifest)) == tmp_path / "elsewhere" / "ws" / "manifest.csv"
    assert moved.absolute("{concept:person}/sub/p0.jpg") == tmp_path / "elsewhere" / "me" / "sub" / "p0.jpg"
    assert moved.absolute("/opt/base.safetensors") == Path("/opt/base.safetensors")  # old records stay readable
    with pytest.raises(UnknownRootError, match="concept 'reg'.*likeness prepare"):
        moved.absolute("{concept:reg}/r0.png")


def test_a_symlinked_concept_folder_is_stored_relative_too(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    ws = Workspace(tmp_path / "ws", (("person", tmp_path / "link"),))
    assert ws.relative(tmp_path / "link" / "a.jpg") == "{concept:person}/a.jpg"
    assert ws.absolute("{concept:person}/a.jpg") == real / "a.jpg"


def test_records_and_results_round_trip_through_portable_and_local(ws, tmp_path):
    from likeness.stages import StageResult

    inside, photo = ws.table("resize"), str(tmp_path / "photos" / "person" / "p0.jpg")
    record = {"source": photo, "outputs": {str(inside): "ab"}, "captions": ["/ not a path", "ohwx man"], "n": 3,
              "files": [Path(inside)]}
    stored = ws.portable(record)
    assert stored == {"source": "{concept:person}/p0.jpg", "outputs": {"{workspace}/prepare/resize.json": "ab"},
                      "captions": ["/ not a path", "ohwx man"], "n": 3, "files": ["{workspace}/prepare/resize.json"]}
    assert json.loads(json.dumps(stored)) == stored and str(tmp_path) not in json.dumps(stored)
    assert ws.local(stored) == record and isinstance(ws.local(stored)["files"][0], Path)
    result = StageResult("resize", inside, "d", 1, 2)
    assert isinstance(ws.portable(result).table, StoredPath) and ws.local(ws.portable(result)) == result
    assert ws.portable(ws.portable(record)) == stored  # writing twice changes nothing


def test_the_hash_index_names_workspace_files_relative(ws, tmp_path):
    file = ws.latent_cache / "k.safetensors"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"latent")
    index = ws.hashes()
    digest = index.digest(file)
    index.save()
    assert list(json.loads(ws.hash_index.read_text())) == ["{workspace}/cache/latents/k.safetensors"]
    moved = Workspace(tmp_path / "moved")
    shutil.copytree(ws.root, moved.root)  # copy2 keeps mtimes, so the moved entry still matches
    copy, stat = moved.latent_cache / "k.safetensors", file.stat()
    copy.write_bytes(b"LATENT")  # same size and mtime, other bytes: only the remembered hash can answer
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert moved.hashes().digest(copy) == digest  # found under its relative name: not hashed again


# --- the whole pipeline, moved ---------------------------------------------------------------

STAGE_TASKS = ("scan-images", "resize-images", "compute-masks", "write-captions", "balance-concepts", "write-manifest",
               "cache-latents", "train-model", "generate-grid", "score-checkpoints", "select-checkpoint")


def stage_states(since: float) -> dict[str, list[str]]:
    """The stage task runs of every flow run started after `since` (the pipeline and its subflows)."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime

    after = datetime.fromtimestamp(since, timezone.utc)
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:  # task runs reach the server as events, a moment after the flow returns
            flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)))
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[f.id for f in flows])))
            states: dict[str, list[str]] = {}
            for run in runs:
                name = run.name.rsplit("-", 1)[0]
                if name in STAGE_TASKS:
                    states.setdefault(name, []).append(run.state.name if run.state else "?")
            settled = all(s not in ("?", "Pending", "Running") for v in states.values() for s in v)
            if (settled and len(states) == len(STAGE_TASKS)) or time.monotonic() > deadline:
                return states
            time.sleep(0.3)


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` but Prefect's own and the watcher's: (size, mtime_ns)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in ("prefect", "watch")}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_flows", "one_torch_thread")
def test_a_moved_workspace_is_all_cached_and_picks_the_same_checkpoint(train_settings, tiny_model_dirs, tmp_path,
                                                                      monkeypatch):
    from likeness.flows.pipeline import pipeline
    from likeness.settings import Settings
    from likeness.tasks import latents as latents_module, masks as masks_module
    from likeness.tasks.evaluate import grid as grid_module
    from likeness.trainer import loop

    evaluation = {"prompts": ["photo of ohwx man"], "seeds_per_prompt": 1, "steps": 2, "metrics": ["dino", "clip_i", "clip_t"],
                  "dino_model": str(tiny_model_dirs.dino), "clip_model": str(tiny_model_dirs.clip)}
    settings = train_settings(prepare=False, training={"epochs": 2}, sampling={"unit": "NEVER", "at_start": False},
                              evaluation=evaluation)
    first = pipeline(settings)
    chosen = first.chosen.relative_to(Workspace.from_settings(settings).root), first.chosen.read_bytes()
    assert len(first.checkpoints) == 2

    # 1. Copy the workspace and the photos elsewhere; the originals vanish, so a stale path fails loudly.
    moved = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(settings.run.workspace, moved / "ws", symlinks=True)
    shutil.copytree(tmp_path / "photos", moved / "photos")
    (tmp_path / "ws").rename(tmp_path / "ws-gone")
    (tmp_path / "photos").rename(tmp_path / "photos-gone")
    data = settings.model_dump(mode="json")
    data["run"]["workspace"] = str(moved / "ws")
    for concept in data["concepts"]:
        concept["path"] = str(moved / "photos" / Path(concept["path"]).name)
    again = Settings.model_validate(data)
    records = [p for p in (moved / "ws").rglob("*") if p.suffix in (".json", ".csv") and "prefect" not in p.parts]
    assert len(records) > 50 and {"manifest.csv", "latents.csv", "progress.json"} <= {p.name for p in records}
    for record in records:  # tables, item records, hash index, backups, evaluation; Prefect's own are its business
        assert str(tmp_path) not in record.read_text(), record
    before = files_of(moved / "ws")

    # 2. The same pipeline on the new places: every stage Cached, no model loaded, no file written.
    for module, name in ((masks_module, "load_model"), (latents_module, "load_encoders"), (loop, "load_models"),
                         (grid_module, "load_candidate")):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"{name}: a cached run loaded a model"))
    since = time.time()
    second = pipeline(again)
    states = stage_states(since)
    assert states == {name: ["Cached"] for name in STAGE_TASKS}
    assert files_of(moved / "ws") == before  # no new latents, checkpoints, grids or copies
    assert second.chosen == moved / "ws" / chosen[0] and second.chosen.read_bytes() == chosen[1]
    assert [c.name for c in second.checkpoints] == [c.name for c in first.checkpoints]
    assert all(c.is_relative_to(moved / "ws") for c in [*second.checkpoints, second.report, *second.grids])
