"""Dataset fingerprints: has anything in the concept folders changed since the last training run?

Cheap first, exact second: every file is `stat`ed, and only files whose (path, size, mtime) differ
from the last fingerprint are read and hashed. The fingerprint itself is the hash of each
concept's file *contents* (a multiset of sha256), never of names or mtimes, so renaming a photo
or touching it without changing its bytes leaves it unchanged; one changed, added or removed file
changes it.

The watcher keeps its state in the workspace (`workspace/watch/dataset.json`), so it survives
restarts of the server and of the watcher: the fingerprint of the last successful training run,
the last one seen (to skip re-hashing), and the one already announced (so one change starts one
run, not one per check).

    state = WatchState.load(watch_state_path(settings.run.workspace))
    current = fingerprint_concepts(settings.concepts, previous=state.reference)
    if current.digest != state.trained_digest: ...
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from likeness.content import digest_parts, file_digest
from likeness.errors import BadInputError
from likeness.files import write_atomic
from likeness.settings import Concept, Settings
from likeness.tasks.common import transient

FINGERPRINT_VERSION = 1


class FingerprintError(BadInputError, ValueError):
    """A concept folder cannot be fingerprinted (missing, not a folder): fix the concept's path."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Changes:
    """What differs between two fingerprints, by content (a rename is no change)."""

    added: int = 0
    removed: int = 0

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed)

    def describe(self) -> str:
        return f"{self.added} new or changed file(s), {self.removed} removed or replaced"


@dataclass(frozen=True)
class Fingerprint:
    """The content of the training concepts: `digest` is what is compared."""

    digest: str
    files: dict[str, FileEntry]  # "<concept>/<relative path>" -> stat and content hash
    hashed: int = 0  # files whose bytes were read to make this fingerprint (the rest came from stat)

    def contents(self) -> Counter[tuple[str, str]]:
        """The multiset of (concept, sha256): what the digest is made of."""
        return Counter((key.split("/", 1)[0], entry.sha256) for key, entry in self.files.items())

    def changes_since(self, other: Fingerprint | None) -> Changes:
        mine, theirs = self.contents(), other.contents() if other else Counter()
        return Changes(added=sum((mine - theirs).values()), removed=sum((theirs - mine).values()))

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "files": {k: [e.size, e.mtime_ns, e.sha256] for k, e in self.files.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        files = {k: FileEntry(int(v[0]), int(v[1]), str(v[2])) for k, v in data["files"].items()}
        return cls(str(data["digest"]), files)


def concept_files(concept: Concept) -> Iterable[Path]:
    """Every non-hidden file of a concept folder: images, caption files, masks the user drew."""
    folder = Path(concept.path).expanduser()
    if not folder.is_dir():
        raise FingerprintError(
            f"concept {concept.name!r}: folder {folder} does not exist or is not a folder; "
            "fix the concept's path in the profile (concepts[...].path)")
    found = folder.rglob("*") if concept.include_subdirectories else folder.iterdir()
    for path in found:
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def fingerprint_concepts(concepts: Sequence[Concept], previous: Fingerprint | None = None) -> Fingerprint:
    """Fingerprint the enabled training concepts, hashing only files that `stat` says are new or changed.

    Validation concepts are left out: they are never trained on, so they never call for retraining.
    """
    known = previous.files if previous else {}
    files: dict[str, FileEntry] = {}
    hashed = 0
    for concept in concepts:
        if not concept.enabled or concept.validation:
            continue
        folder = Path(concept.path).expanduser()
        for path in concept_files(concept):
            key = f"{concept.name}/{path.relative_to(folder).as_posix()}"
            stat = os.stat(path)
            entry = known.get(key)
            if entry is None or (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                entry = FileEntry(stat.st_size, stat.st_mtime_ns, file_digest(path))  # a candidate: confirm by content
                hashed += 1
            files[key] = entry
    contents = sorted((key.split("/", 1)[0], entry.sha256) for key, entry in files.items())
    return Fingerprint(digest_parts("dataset-fingerprint", FINGERPRINT_VERSION, contents), files, hashed)


# --- the watcher's memory --------------------------------------------------------------------


def watch_state_path(workspace: str | Path) -> Path:
    return Path(workspace).expanduser().resolve() / "watch" / "dataset.json"


@dataclass
class WatchState:
    """What the watcher remembers between checks, in one JSON file in the workspace."""

    path: Path
    trained: Fingerprint | None = None  # the dataset of the last successful training run
    seen: Fingerprint | None = None  # the last fingerprint computed (its stats spare re-hashing)
    announced: str | None = None  # a digest already announced by an event, not trained yet

    @property
    def reference(self) -> Fingerprint | None:
        """The fingerprint whose stats decide which files need hashing."""
        return self.seen or self.trained

    @property
    def trained_digest(self) -> str | None:
        return self.trained.digest if self.trained else None

    @classmethod
    def load(cls, path: str | Path) -> WatchState:
        path = Path(path)
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, *(Fingerprint.from_json(data[k]) if data.get(k) else None for k in ("trained", "seen")),
                       announced=data.get("announced"))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise FingerprintError(
                f"{path}: the watcher's state is damaged ({exc}); delete the file to start over "
                "(the next check then announces the dataset once)") from None

    def save(self) -> Path:
        data = {"version": FINGERPRINT_VERSION, "trained": self.trained.to_json() if self.trained else None,
                "seen": self.seen.to_json() if self.seen else None, "announced": self.announced}
        return write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))


@dataclass(frozen=True)
class Check:
    """One look at the dataset: whether it differs from what was trained, and whether to announce it."""

    current: Fingerprint
    changes: Changes
    changed: bool  # differs from the last successful training (or nothing was trained yet)
    announce: bool  # changed, and this digest was not announced before


def check_dataset(concepts: Sequence[Concept], workspace: str | Path) -> Check:
    """Fingerprint the concepts, compare with the last training, and remember what was seen."""
    state = WatchState.load(watch_state_path(workspace))
    current = fingerprint_concepts(concepts, previous=state.reference)
    changed = current.digest != state.trained_digest
    state.seen = Fingerprint(current.digest, current.files)
    state.save()
    return Check(current, current.changes_since(state.trained), changed, changed and current.digest != state.announced)


def record_announced(workspace: str | Path, digest: str) -> Path:
    """Remember that a change to `digest` was announced, so later checks do not announce it again."""
    state = WatchState.load(watch_state_path(workspace))
    state.announced = digest
    return state.save()


def record_trained(workspace: str | Path, fingerprint: Fingerprint) -> Path:
    """Remember `fingerprint` as the dataset of the last successful training run."""
    state = WatchState.load(watch_state_path(workspace))
    state.trained = Fingerprint(fingerprint.digest, fingerprint.files)
    if state.announced == fingerprint.digest:
        state.announced = None
    return state.save()


def dataset_to_train(concepts: Sequence[Concept], workspace: str | Path) -> Fingerprint | None:
    """The concepts' fingerprint as a training starts (the watcher's stats spare re-hashing);
    None when a concept folder is gone (training reads the prepared copies and goes on)."""
    try:
        return fingerprint_concepts(concepts, previous=WatchState.load(watch_state_path(workspace)).reference)
    except FingerprintError:
        return None


# --- Prefect task ----------------------------------------------------------------------------


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


@task(name="record-trained-dataset", cache_policy=NO_CACHE)
def record_trained_dataset(settings: Settings, dataset: Fingerprint | None) -> str | None:
    """After a successful training (`likeness train`, `run`, `demo` or a deployment): the watcher
    compares with this dataset from now on, so it does not announce it again."""
    if dataset is None:
        get_run_logger().warning("a concept folder is missing: the dataset trained on is not recorded for the watcher")
        return None
    record_trained(settings.run.workspace, dataset)
    get_run_logger().info("dataset %s recorded as the last trained one (for the watcher)", dataset.digest[:12])
    return dataset.digest


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
