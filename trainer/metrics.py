"""What training reports besides checkpoints: the sink protocol, the loss table and curve, memory.

A sink receives the loop's scalars (loss, learning rate per part) and sample images; the
TensorBoard sink and the Prefect task implement it, the loop knows neither. The loss table is a
CSV (`reports/loss.csv`: step, epoch, loss, lr_<part>...) and the curve a PNG drawn with
matplotlib's Agg backend (no display needed); both are written atomically.

    class PrintSink:
        def scalars(self, step, values): print(step, values)
        def image(self, step, tag, image): ...
        def close(self): ...
    log = LossLog(); log.add(step=1, epoch=0, loss=0.12, lr_unet=1e-5)
    log.write_csv(ws.report("loss.csv")); log.plot(ws.report("loss.png"))
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from likeness.files import atomic_path, write_atomic


@runtime_checkable
class MetricsSink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: Any) -> None: ...

    def close(self) -> None: ...


def memory_stats(device: torch.device) -> dict[str, float]:
    """GPU memory allocated / reserved / peak in GiB on CUDA (columns of the loss table); empty elsewhere."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib}


def memory_summary(device: torch.device) -> str:
    """The same figures for a progress line: `mem 9.81/11.20 GiB (peak 10.42)`; empty off CUDA."""
    stats = memory_stats(device)
    if not stats:
        return ""
    return (f"mem {stats['mem_allocated_gib']:.2f}/{stats['mem_reserved_gib']:.2f} GiB "
            f"(peak {stats['mem_peak_gib']:.2f})")


class LossLog:
    """One row per optimizer step; kept in backups so a resumed run's table is complete."""

    def __init__(self, rows: list[dict[str, float]] | None = None) -> None:
        self.rows = list(rows or [])

    def add(self, **row: float) -> None:
        self.rows.append(row)

    def write_csv(self, path: Path) -> Path:
        columns = list(dict.fromkeys(key for row in self.rows for key in row)) or ["step", "epoch", "loss"]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return write_atomic(path, out.getvalue())

    def plot(self, path: Path, title: str = "training loss") -> Path:
        """Per-step loss (faint) and its moving average over about 5 % of the steps."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        steps = [row["step"] for row in self.rows]
        losses = [row["loss"] for row in self.rows]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
        ax.plot(steps, losses, alpha=0.3, label="loss")
        ax.plot(steps, smooth, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path


class ProgressLine:
    """Progress lines (step, epoch, loss, it/s, ETA, GPU memory): at most one per `every_seconds`, or forced."""

    def __init__(self, log: Callable[[str], None], total_steps: int, epochs: int, device: torch.device,
                 first_step: int = 0, every_seconds: float = 30.0) -> None:
        self.log, self.total_steps, self.epochs, self.device = log, total_steps, epochs, device
        self.first_step, self.every = first_step, every_seconds
        self.started = self.last = time.monotonic()

    def update(self, step: int, epoch: int, loss: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
        self.log(f"step {step}/{self.total_steps} epoch {epoch}/{self.epochs} loss {loss:.4f} "
                 f"{rate:.2f} it/s ETA {eta} {memory_summary(self.device)}".rstrip())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
