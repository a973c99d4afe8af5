"""What a training run returns (the training stage's cached result): no torch, so that reading a
cached result costs no import of the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    sha256: str
    epoch: int
    step: int


@dataclass
class TrainResult:
    checkpoints: list[SavedCheckpoint]
    final_checkpoint: Path
    steps: int
    epochs: int
    loss_table: Path
    loss_curve: Path
    resumed_from: Path | None = None
    samples: list[Path] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # in-training evaluations (trainer/evaluation.py)
    stopped_early: str | None = None  # why early stop ended the run before training.epochs

    def summary(self) -> str:
        resumed = f", resumed from {self.resumed_from.name}" if self.resumed_from else ""
        resumed += f", stopped early ({self.stopped_early})" if self.stopped_early else ""
        return (f"train: {self.steps} steps, {self.epochs} epochs{resumed}; {len(self.checkpoints)} checkpoint(s), "
                f"final {self.final_checkpoint}")
