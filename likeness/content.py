"""Content hashes: the cache keys of every prepare stage are made of these, never of mtimes alone.

A `HashIndex` remembers (size, mtime_ns) -> sha256 per file, so a re-run with nothing changed
stats files instead of reading them; the content hash stays the key. Models are fingerprinted by
the content of their files (a local folder or single file) or by their hub id.

    index = ws.hashes()
    key = digest_parts("resize", 1, index.digest(photo), settings.resize.resolution)
    index.save()
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from likeness.files import write_atomic


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_parts(*parts: Any) -> str:
    """A stable sha256 of JSON-able parts (paths and other objects are written with str())."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HashIndex:
    """File content hashes, remembered by (size, mtime_ns) in a JSON file (or only in memory).

    Files are named in the index by `name` (an absolute path -> its entry's name; default: the
    absolute path itself) and found again by `locate`: `Workspace.hashes()` names them relative to
    the workspace and concept folders, so a moved workspace keeps its index.
    """

    def __init__(self, path: str | Path | None = None, name: Callable[[str], str] = str,
                 locate: Callable[[str], Any] = Path):
        self.path = Path(path) if path else None
        self._name, self._locate = name, locate
        self._entries: dict[str, list] = {}
        self._lock = threading.Lock()
        self._dirty = False
        if self.path and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # a damaged index only costs re-hashing
                self._entries = {}

    def digest(self, path: str | Path) -> str:
        """The sha256 of `path`, read from disk only when its size or mtime changed."""
        file = str(Path(path).resolve())
        stat = os.stat(file)
        name = self._name(file)
        entry = self._entries.get(name)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        value = file_digest(file)
        self._store(name, stat, value)
        return value

    def remember(self, path: str | Path, digest: str) -> None:
        """Record the hash of a file just written from bytes we already hashed."""
        file = str(Path(path).resolve())
        self._store(self._name(file), os.stat(file), digest)

    def current(self, path: str | Path) -> str | None:
        """The file's hash, or None when it does not exist."""
        try:
            return self.digest(path)
        except FileNotFoundError:
            return None

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        with self._lock:
            live = {k: v for k, v in self._entries.items() if self._exists(k)}
            write_atomic(self.path, json.dumps(live, separators=(",", ":")))
            self._dirty = False

    def _exists(self, name: str) -> bool:
        try:
            return os.path.exists(self._locate(name))
        except LookupError:  # a concept the settings no longer have: forget its files
            return False

    def _store(self, name: str, stat: os.stat_result, value: str) -> None:
        with self._lock:
            self._entries[name] = [stat.st_size, stat.st_mtime_ns, value]
            self._dirty = True


def folder_digest(folder: Path, index: HashIndex, subfolders: Iterable[str] = ()) -> str:
    """Hash of every non-hidden file under `folder` (or only under the given subfolders)."""
    roots = [folder / s for s in subfolders] or [folder]
    files = sorted(p for root in roots if root.is_dir() for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return digest_parts([(p.relative_to(folder).as_posix(), index.digest(p)) for p in files])


def model_fingerprint(model: str, index: HashIndex, subfolders: Iterable[str] = ()) -> str:
    """What a stage's cache key records of a model: its files' content, or `hub:<id>` for a hub id.

    A hub id is keyed by name only (the files may not be downloaded yet when the key is made);
    point the settings at a local folder to key on the weights themselves.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return "file:" + index.digest(path)
    if path.is_dir():
        return "folder:" + folder_digest(path, index, subfolders)
    return f"hub:{model}"
