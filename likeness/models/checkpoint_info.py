"""What a likeness checkpoint carries besides weights, and reading it back without loading a tensor.

Apart from `likeness.models.checkpoint` (torch, the key maps): evaluation's cache keys read every
checkpoint's epoch and step, and a cached run should not import torch for that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

from safetensors import safe_open

ARCHITECTURE = "stable-diffusion-xl-v1-base"
FOLDER_METADATA = "likeness.json"  # a diffusers-folder checkpoint's metadata, written last


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint carries besides weights; selection reads this, not the run's memory."""

    base_model: str
    epoch: int
    step: int
    settings_hash: str = ""
    dtype: str = ""
    version: str = ""
    architecture: str = ARCHITECTURE

    def metadata(self) -> dict[str, str]:
        """safetensors metadata: strings only."""
        return {"format": "pt", "modelspec.architecture": self.architecture,
                "likeness.base_model": self.base_model, "likeness.epoch": str(self.epoch),
                "likeness.step": str(self.step), "likeness.settings_hash": self.settings_hash,
                "likeness.dtype": self.dtype, "likeness.version": self.version or likeness_version()}


def likeness_version() -> str:
    try:
        return package_metadata.version("likeness")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def load_checkpoint_metadata(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint this module wrote (a .safetensors file or a diffusers folder)."""
    path = Path(path)
    if path.is_dir():
        try:
            raw = json.loads((path / FOLDER_METADATA).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: no readable {FOLDER_METADATA} ({error}); not a likeness checkpoint") from error
    else:
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw = f.metadata() or {}
        except Exception as error:  # safetensors raises its own types for missing or corrupt files
            raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error
    if "likeness.epoch" not in raw:
        raise ValueError(f"{path}: no likeness metadata (written by another tool?)")
    return CheckpointInfo(base_model=raw.get("likeness.base_model", ""), epoch=int(raw["likeness.epoch"]),
                          step=int(raw.get("likeness.step", 0)), settings_hash=raw.get("likeness.settings_hash", ""),
                          dtype=raw.get("likeness.dtype", ""), version=raw.get("likeness.version", ""),
                          architecture=raw.get("modelspec.architecture", ""))
