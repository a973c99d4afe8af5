"""What every prepare stage shares: its table on disk, per-item records, and its result.

A stage reads the previous stage's table (`workspace/prepare/<stage>.json`), does its work item
by item, and writes its own table. Each item's result is stored as a record keyed by the content
the item depends on, so a re-run redoes only items whose inputs changed, and a run killed half
way redoes only the items it had not finished. A record is trusted only while the files it lists
as outputs still hold the content it recorded.

Table format (JSON): {"stage", "version", "rows": [{"id": "<concept>/<stem>", ...}, ...],
"outputs": {path: sha256}, "extra": {...}}. Row ids are `<concept>/<stem path>`. Paths in tables and
records are stored relative to the workspace or a concept folder (`Workspace.portable`) and read
back as absolute paths (`Workspace.local`): in memory a row's paths are absolute, on disk relative.

    rows, counts = map_cached(items, key=lambda row: digest_parts(...), compute=work, records=records)
    result = write_table(ws, "resize", RESIZE_VERSION, rows, counts)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from likeness.content import HashIndex, bytes_digest, file_digest
from likeness.errors import BadInputError
from likeness.files import write_atomic
from likeness.workspace import Workspace

Row = dict[str, Any]
Progress = Callable[[int, int], None]  # (items done, items in all)

# The stages whose tables each stage reads.
PREVIOUS = {
    "generate": (), "scan": (), "resize": ("scan",), "masks": ("resize",), "captions": ("resize",), "balance": ("resize",),
    "manifest": ("resize", "masks", "captions", "balance"), "latents": ("manifest",),
}


# The profile named in "run `likeness ... --profile <profile>`" hints: the CLI and the entry flows
# set the one the run was started with, so a message says what to type.
RUN_PROFILE: ContextVar[str] = ContextVar("likeness_run_profile", default="<profile>")


@contextmanager
def run_profile(profile: str | None) -> Iterator[None]:
    """Name `profile` in the error hints raised inside this block (see RUN_PROFILE)."""
    token = RUN_PROFILE.set(profile or "<profile>")
    try:
        yield
    finally:
        RUN_PROFILE.reset(token)


def rerun_hint(command: str) -> str:
    """`likeness <command> --profile <the run's profile>`."""
    return f"likeness {command} --profile {RUN_PROFILE.get()}"


class PrepareError(BadInputError):
    """A problem with the user's data or settings: retrying will not help, fixing the input will."""


class MissingStageError(PrepareError):
    """A stage was run before the stage whose output it reads."""

    def __init__(self, stage: str, needs: str, path: Path):
        self.stage, self.needs, self.path = stage, needs, path
        super().__init__(
            f"stage '{stage}' needs the output of stage '{needs}' ({path}), which does not exist yet: "
            f"run `{rerun_hint(f'stage {needs}')}` (or `{rerun_hint('prepare')}`) first"
        )


@dataclass(frozen=True)
class StageResult:
    """What a stage task returns (and Prefect persists): where its table is and what it did."""

    stage: str
    table: Path
    table_digest: str
    processed: int
    reused: int
    cached: bool = False  # the whole stage came from Prefect's cache: nothing ran

    @property
    def total(self) -> int:
        return self.processed + self.reused

    def as_cached(self) -> StageResult:
        """This result as a cached run reports it: every item reused."""
        return replace(self, processed=0, reused=self.total, cached=True)

    def summary(self) -> str:
        how = "cached" if self.cached else f"{self.processed} processed, {self.reused} reused"
        return f"{self.stage}: {how} ({self.table})"


@dataclass
class Counts:
    processed: int = 0
    reused: int = 0


# --- tables ----------------------------------------------------------------------------------


def write_table(ws: Workspace, stage: str, version: int, rows: list[Row], counts: Counts,
                outputs: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> StageResult:
    """Write a stage's table atomically; `outputs` defaults to the union of the rows' outputs."""
    if outputs is None:
        outputs = {path: digest for row in rows for path, digest in row.get("outputs", {}).items()}
    payload = ws.portable({"stage": stage, "version": version, "rows": rows, "outputs": outputs, "extra": extra or {}})
    data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode("utf-8")
    path = write_atomic(ws.table(stage), data)
    return StageResult(stage, path, bytes_digest(data), counts.processed, counts.reused)


def upstream(ws: Workspace, stage: str, reader: str) -> StageResult:
    """The result of a stage already run, read from its table on disk (to run `reader` alone)."""
    path = ws.table(stage)
    if not path.is_file():
        raise MissingStageError(reader, stage, path)
    return StageResult(stage, path, file_digest(path), 0, 0)


def load_rows(result: StageResult, ws: Workspace) -> list[Row]:
    """A stage table's rows, their paths absolute in `ws`."""
    return ws.local(json.loads(result.table.read_text(encoding="utf-8"))["rows"])


def outputs_intact(result: StageResult, ws: Workspace, index: HashIndex) -> bool:
    """Whether the table and every output it lists still hold the content recorded (cheap: stats)."""
    if index.current(result.table) != result.table_digest:
        return False
    outputs = ws.local(json.loads(result.table.read_text(encoding="utf-8")).get("outputs", {}))
    return all(index.current(path) == digest for path, digest in outputs.items())


# --- per-item records ------------------------------------------------------------------------


class ItemRecords:
    """One stage's per-item results, a JSON file per content key (paths relative, as in tables)."""

    def __init__(self, folder: Path, index: HashIndex, ws: Workspace):
        self.folder, self.index, self.ws = folder, index, ws

    def get(self, key: str) -> Row | None:
        try:
            row = self.ws.local(json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, LookupError):  # LookupError: a concept the settings no longer have
            return None
        outputs = row.get("outputs", {})
        if all(self.index.current(path) == digest for path, digest in outputs.items()):
            return row
        return None

    def put(self, key: str, row: Row) -> None:
        write_atomic(self.folder / f"{key}.json", json.dumps(self.ws.portable(row), sort_keys=True, default=str))


def map_cached(items: Sequence[Row], key: Callable[[Row], str], compute: Callable[[list[Row]], list[Row]],
               records: ItemRecords, batch_size: int = 1, progress: Progress | None = None) -> tuple[list[Row], Counts]:
    """Rows for `items` in order: from records where valid, else `compute(batch)` (one row per item).

    `compute` runs only on the items that miss, `batch_size` at a time, and each finished batch is
    recorded at once, so a crash loses at most the batch in flight. Models belong inside `compute`
    (loaded on first use), so nothing is loaded when every item is cached.
    """
    keys = [key(item) for item in items]
    rows: list[Row | None] = [records.get(k) for k in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    counts = Counts(processed=len(missing), reused=len(items) - len(missing))
    done = counts.reused
    if progress:
        progress(done, len(items))
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        computed = compute([items[i] for i in batch])
        for i, row in zip(batch, computed, strict=True):
            records.put(keys[i], row)
            rows[i] = row
        done += len(batch)
        if progress:
            progress(done, len(items))
    return [row for row in rows if row is not None], counts
