"""Backups for resuming training: trained weights, optimizer, EMA, LR scheduler, sampler position,
RNG states and progress, written so that a killed run never leaves a backup a later run trusts.

No pickle: weights are safetensors, the rest is JSON + safetensors (`state_tree`), so a backup from a
shared workspace is read without running code. A backup of an older likeness (`objects.pt`) is read
with `torch.load(weights_only=True)`, allowing only numpy's array type (the RNG state); anything else
in it is refused with an error naming the file.

A backup is a folder `backup-<step>` under the run's backup folder. It is written under a hidden
temporary name and renamed into place only when every file is on disk (a folder rename is
atomic), so a half-written backup is never picked up; leftovers are removed on the next save.
Each backup records a fingerprint of what it was trained on (settings + data): a run resumes only
from a backup with the same fingerprint.

    path = save_backup(root, step=120, fingerprint=fp, weights={"unet": unet.state_dict()},
                       objects={"optimizer": opt.state_dict()}, progress={"epoch": 3}, keep=3)
    backup = latest_backup(root, fingerprint=fp)   # None when there is nothing to resume
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from likeness.trainer.state_tree import read_state, write_state

PROGRESS_FILE = "progress.json"
OBJECTS = "objects"  # objects.json + objects.safetensors
LEGACY_OBJECTS_FILE = "objects.pt"


class BackupError(ValueError):
    """A backup that cannot be trusted or read: the message names the folder and what to do."""


@dataclass
class Backup:
    path: Path
    step: int
    progress: dict[str, Any]

    def weights(self, part: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{part}.safetensors")

    def parts(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.safetensors") if p.stem != OBJECTS)

    def objects(self) -> dict[str, Any]:
        if (self.path / LEGACY_OBJECTS_FILE).is_file() and not _has_objects(self.path):
            return _load_legacy(self.path / LEGACY_OBJECTS_FILE)
        return read_state(self.path / OBJECTS)


def _has_objects(folder: Path) -> bool:
    return all((folder / f"{OBJECTS}{suffix}").is_file() for suffix in (".json", ".safetensors"))


def _load_legacy(path: Path) -> dict[str, Any]:
    """An `objects.pt` of an older likeness: tensors and plain data, plus numpy arrays (RNG state)."""
    from numpy._core.multiarray import _reconstruct  # how numpy pickles an array

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for a forbidden global; anything for a damaged file
        reason = str(error).splitlines()[-1] if str(error) else type(error).__name__
        raise BackupError(
            f"{path}: refused to load this backup: it holds Python objects other than tensors and plain data "
            f"({reason}); backups are never unpickled, since a pickle can run code. Delete {path.parent} "
            "to resume from an older backup, or the backups folder to start over") from None


def save_backup(
    root: str | Path,
    *,
    step: int,
    fingerprint: str,
    weights: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    progress: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write a complete backup atomically, then delete all but the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    tmp = Path(tempfile.mkdtemp(prefix=".backup-", suffix=".tmp", dir=root))
    for part, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{part}.safetensors")
    write_state(tmp / OBJECTS, objects | {"rng": capture_rng()})
    record = {"step": step, "fingerprint": fingerprint, "progress": progress}
    (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=2))
    _fsync_folder(tmp)
    final = root / f"backup-{step:09d}"
    if final.exists():  # a re-run reached the same step: the new backup replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def list_backups(root: str | Path, fingerprint: str | None = None) -> list[Backup]:
    """Complete backups, oldest first; only those with `fingerprint` when given."""
    found = []
    for folder in sorted(Path(root).glob("backup-*")):
        record_file = folder / PROGRESS_FILE
        complete = _has_objects(folder) or (folder / LEGACY_OBJECTS_FILE).is_file()
        if not (folder.is_dir() and record_file.is_file() and complete):
            continue
        record = json.loads(record_file.read_text())
        if fingerprint is None or record["fingerprint"] == fingerprint:
            found.append(Backup(folder, record["step"], record["progress"]))
    return sorted(found, key=lambda b: b.step)


def latest_backup(root: str | Path, fingerprint: str) -> Backup | None:
    backups = list_backups(root, fingerprint)
    return backups[-1] if backups else None


def capture_rng() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _prune(root: Path, keep: int) -> None:
    for old in list_backups(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    for leftover in root.glob(".backup-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
