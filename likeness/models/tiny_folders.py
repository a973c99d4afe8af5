"""The folders the tiny models are saved in: a marker written last says a build is complete.

Kept apart from `likeness.models.tiny` (torch, diffusers, transformers) so that checking for a
finished build costs no import: a second `likeness demo` only reads four small JSON files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILDER_VERSION = 2  # bump when a config or the vocabulary changes: saved folders are rebuilt
MARKER = "likeness-tiny.json"  # written last: a folder with it is complete
KINDS = ("sdxl", "clipseg", "dino", "clip")  # the folders `save_tiny_models` writes, by kind


def _marker(kind: str, seed: int) -> dict[str, object]:
    return {"builder": "likeness.models.tiny", "version": BUILDER_VERSION, "kind": kind, "seed": seed}


def is_complete(folder: Path, kind: str, seed: int) -> bool:
    """Whether `folder` holds a finished build of this kind, seed and builder version."""
    try:
        return json.loads((folder / MARKER).read_text()) == _marker(kind, seed)
    except (OSError, ValueError):
        return False


def all_complete(out_dir: Path, seed: int) -> bool:
    """Whether every folder `save_tiny_models(out_dir, seed)` writes is already there, complete."""
    return all(is_complete(Path(out_dir) / kind, kind, seed) for kind in KINDS)


def write_atomically(target: Path, kind: str, seed: int, save: Callable[[Path, int], None]) -> Path:
    """Build into a temporary sibling, write the marker last, then rename it into place."""
    if is_complete(target, kind, seed):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save(tmp, seed)
        (tmp / MARKER).write_text(json.dumps(_marker(kind, seed), indent=2) + "\n")
        _replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; a stale or incomplete `target` is moved aside and deleted."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(new, target)
    except OSError:  # another process finished the same build first: keep theirs
        if not target.is_dir():
            raise
