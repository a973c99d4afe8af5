"""The workspace layout: every path a run writes, derived from `settings.run.workspace`.

One place for the names, so the prepare, training and evaluation stages agree on them:

    workspace/
      prepared/<concept>/<stem>.png          prepared image (fit + pad to resolution, RGB, lossless)
      prepared/<concept>/<stem>-masklabel.png  its mask (L, same size), when the concept has one
      prepared/<concept>/<stem>.txt          its caption, one line per text variation
      manifest.csv                           the validated table later stages read (manifest.py)
      latents.csv                            manifest id -> latent / text cache files (latents.py)
      cache/latents/<key>.safetensors        VAE latents + downscaled masks, keyed by content
      cache/text/<key>.safetensors           frozen text-encoder outputs, keyed by caption + encoder
      reports/                               scan-report.md, masks-report.md, balance.md, speed.json
      prepare/<stage>.json                   each prepare stage's table (what the next stage reads)
      prepare/items/<stage>/<key>.json       per-image results, so one changed photo redoes one item
      prepare/user-masks/<concept>/<stem>.png  masks the user drew, fit + padded like their image
      prepare/hash-index.json                size + mtime -> content hash, to skip re-hashing
      prefect/                               Prefect's persisted task results (the stage cache)
      samples/ save/ backup/ output/         training and evaluation outputs
      tensorboard/                           TensorBoard event files (training.tensorboard)

`prepared/` is laid out like a OneTrainer concept folder, so it can be opened there as well.

Relocatable: every record (stage tables, item records, manifest.csv, latents.csv, the hash index,
backups, evaluation tables, Prefect's persisted results) stores a path inside the workspace as
`{workspace}/<relative POSIX path>` and a path inside a concept's folder as
`{concept:<name>}/<relative POSIX path>`; only paths outside both (a base model file) stay
absolute. So the workspace and the concept folders can be moved or mounted elsewhere, and a run
with settings pointing at the new places is all `Cached`. `relative` writes such a path, `absolute`
reads it back; `portable` / `local` do the same for every path in a record or result.

    ws = Workspace.from_settings(settings)
    ws.prepared_image("person", "img001")  # workspace/prepared/person/img001.png
    ws.relative(ws.manifest)               # "{workspace}/manifest.csv"
    ws.absolute("{concept:person}/a.jpg")  # <the person concept's folder>/a.jpg
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path, PurePath
from typing import Any

from likeness.content import HashIndex
from likeness.errors import BadInputError
from likeness.paths import absolute as absolute_path
from likeness.paths import nested
from likeness.settings import Settings

PREPARE_STAGES = ("scan", "resize", "masks", "captions", "balance", "manifest", "latents")
WORKSPACE_MARK = "{workspace}"
CONCEPT_MARK = "{concept:%s}"


class StoredPath(str):
    """A `Path` as `Workspace.portable` stores it (so `local` gives a `Path` back, not a `str`)."""


class UnknownRootError(BadInputError, LookupError):
    """A record names a concept that the settings no longer have."""


def is_stored(text: str) -> bool:
    """Whether `text` is a path as `Workspace.relative` writes it relative to a root."""
    return text.startswith(WORKSPACE_MARK) or (text.startswith("{concept:") and "}" in text)


@dataclass(frozen=True)
class Workspace:
    """Paths inside one run's workspace folder (absolute), and the concept folders records are relative to."""

    root: Path
    concept_roots: tuple[tuple[str, Path], ...] = ()  # (concept name, its folder), for `relative` / `absolute`

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", absolute_path(self.root))
        object.__setattr__(self, "concept_roots", tuple((name, absolute_path(p)) for name, p in self.concept_roots))

    @classmethod
    def from_settings(cls, settings: Settings) -> Workspace:
        return cls(settings.run.workspace, tuple((c.name, c.path) for c in settings.concepts))

    # --- paths in records ---------------------------------------------------------------------

    def _roots(self) -> list[tuple[str, Path]]:
        """(mark, folder), the deepest folder first (concept folders may nest; the workspace wins a tie)."""
        roots = [(WORKSPACE_MARK, self.root), *((CONCEPT_MARK % name, root) for name, root in self.concept_roots)]
        return sorted(roots, key=lambda pair: len(pair[1].parts), reverse=True)

    def relative(self, path: str | os.PathLike[str]) -> str:
        """`path` as records store it: `{workspace}/...` or `{concept:<name>}/...` (POSIX), else absolute."""
        given = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        roots = self._roots()
        for candidate in (given, given.resolve()):  # resolved too: a concept folder given through a symlink
            for mark, root in roots:
                if nested(candidate, root):
                    rest = candidate.relative_to(root).as_posix()
                    return mark if rest == "." else f"{mark}/{rest}"
        return str(given)

    def absolute(self, stored: str | os.PathLike[str]) -> Path:
        """The path a record's `stored` path means here (an absolute one as it is)."""
        text = os.fspath(stored)
        if not is_stored(text):
            return Path(text) if os.path.isabs(text) else self.root / text
        mark, _, rest = text.partition("/")
        if mark == WORKSPACE_MARK:
            root = self.root
        else:
            name = mark[len("{concept:"):-1]
            found = dict(self.concept_roots)
            if name not in found:
                raise UnknownRootError(f"{text!r} (in a record of the workspace {self.root}) lies in the folder of concept "
                                       f"'{name}', which the settings do not have (concepts: {', '.join(found) or 'none'}): "
                                       "add the concept back, or run `likeness prepare` again")
            root = found[name]
        return root / rest if rest else root

    def portable(self, value: Any) -> Any:
        """`value` (a record, a stage's result) with every absolute path in it written by `relative`."""
        if isinstance(value, PurePath):
            return StoredPath(self.relative(value))
        if isinstance(value, str) and os.path.isabs(value) and not isinstance(value, StoredPath):
            stored = self.relative(value)  # a text that merely starts with "/" stays as it is
            return stored if is_stored(stored) else value
        return self._map(value, self.portable)

    def local(self, value: Any) -> Any:
        """What `portable` wrote, read back: paths in this workspace (and concept folders) as they lie now."""
        if isinstance(value, StoredPath):
            return self.absolute(value)
        if isinstance(value, str):
            return str(self.absolute(value)) if is_stored(value) else value
        return self._map(value, self.local)

    @staticmethod
    def _map(value: Any, convert: Any) -> Any:
        if isinstance(value, dict):
            return {convert(k): convert(v) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(convert(v) for v in value)
        if is_dataclass(value) and not isinstance(value, type):
            return replace(value, **{f.name: convert(getattr(value, f.name)) for f in fields(value) if f.init})
        return value

    def hashes(self) -> HashIndex:
        """The workspace's hash index, its files named as records name them (so it survives a move)."""
        return HashIndex(self.hash_index, name=self.relative, locate=self.absolute)

    # --- prepared dataset ---------------------------------------------------------------------

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def prepared_image(self, concept: str, stem: str, suffix: str = ".png") -> Path:
        return self.prepared / concept / f"{stem}{suffix}"

    def prepared_mask(self, concept: str, stem: str) -> Path:
        return self.prepared / concept / f"{stem}-masklabel.png"

    def prepared_caption(self, concept: str, stem: str) -> Path:
        return self.prepared / concept / f"{stem}.txt"

    def user_mask(self, concept: str, stem: str) -> Path:
        return self.prepare_dir / "user-masks" / concept / f"{stem}.png"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def latents_index(self) -> Path:
        return self.root / "latents.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def latent_cache(self) -> Path:
        return self.cache / "latents"

    @property
    def text_cache(self) -> Path:
        return self.cache / "text"

    # --- stage bookkeeping --------------------------------------------------------------------

    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    def table(self, stage: str) -> Path:
        """The table a prepare stage writes for the next one (with the sha256 of each file it wrote)."""
        return self.prepare_dir / f"{stage}.json"

    def item_records(self, stage: str) -> Path:
        return self.prepare_dir / "items" / stage

    @property
    def hash_index(self) -> Path:
        return self.prepare_dir / "hash-index.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, name: str) -> Path:
        return self.reports / name

    @property
    def measured_speed(self) -> Path:
        """Training writes {"iterations_per_second": x} here; duration estimates prefer it."""
        return self.reports / "speed.json"

    @property
    def prefect_results(self) -> Path:
        return self.root / "prefect"

    # --- training and evaluation --------------------------------------------------------------

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "save"

    @property
    def backups(self) -> Path:
        return self.root / "backup"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (when training.tensorboard is on): `likeness tensorboard` shows them."""
        return self.root / "tensorboard"
