"""TensorBoard for training: a metrics sink writing event files under `workspace/tensorboard/`.

The training loop hands its scalars (loss, learning rates) and sample images to every sink it is
given; `sinks_from_settings` returns this one when `training.tensorboard` is on (off by default,
as in the reference run). It needs the optional `tensorboard` package:
`pip install 'likeness[tensorboard]'`. Event files are append-only logs that TensorBoard reads
while they grow (each record carries a CRC, so a killed run leaves a readable prefix); a resumed
run passes its first step as `start_step` and TensorBoard drops the older events from that step
on, so the curves do not fold back on themselves.

    sinks = sinks_from_settings(settings, Workspace.from_settings(settings))
    likeness tensorboard --profile sdxl-person            # prints the logdir and the viewer command
    likeness tensorboard --profile sdxl-person --start    # starts the viewer on 127.0.0.1
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from likeness.errors import BadInputError
from likeness.settings import Settings
from likeness.workspace import Workspace

INSTALL_HINT = "pip install 'likeness[tensorboard]' (or pip install tensorboard)"
DEFAULT_PORT = 6006


class TensorBoardMissing(BadInputError, ImportError):
    """The tensorboard package is not installed; the message says how to install it."""


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TensorBoardMissing(
            f"training.tensorboard is on but the tensorboard package is missing: {INSTALL_HINT}, "
            f"or set training.tensorboard = false ({exc})") from exc
    return SummaryWriter


class TensorBoardSink:
    """Scalars and images to TensorBoard event files in `logdir` (a metrics sink of the training loop)."""

    def __init__(self, logdir: str | Path, start_step: int | None = None, flush_secs: int = 30) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = _summary_writer_class()(log_dir=str(self.logdir), purge_step=start_step,
                                               flush_secs=flush_secs)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def image(self, step: int, tag: str, image: Image.Image) -> None:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def sinks_from_settings(settings: Settings, ws: Workspace, start_step: int | None = None) -> list[TensorBoardSink]:
    """[TensorBoardSink] when `training.tensorboard` is on, else []; a clear error when the package is missing."""
    if not settings.training.tensorboard:
        return []
    return [TensorBoardSink(ws.tensorboard, start_step=start_step)]


def viewer_command(logdir: str | Path, port: int = DEFAULT_PORT) -> list[str]:
    """The command that starts TensorBoard on `logdir`, bound to 127.0.0.1 only."""
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
            "--port", str(port)]


def require_tensorboard() -> None:
    """Raise TensorBoardMissing (with the install command) unless the tensorboard package imports."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise TensorBoardMissing(f"the tensorboard package is missing: {INSTALL_HINT}") from exc
