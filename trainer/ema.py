"""Exponential moving average of the trained weights, for sampling and saving a smoother model.

After every optimizer step `ema.step(params, global_step)`; every `update_step_interval` steps the
averages move towards the weights: ema += (1 - d)(p - ema), with OneTrainer's warm-up
d = min(decay, (1 + step)/(10 + step)) so early averages are not stuck at the base model. The
averages are kept in float32 (bf16 could not hold the small moves) on the weights' device, or on the
CPU to save accelerator memory.

    ema = EMA(unet.parameters(), decay=0.999, update_step_interval=1, on_cpu=True)
    ema.step(unet.parameters(), global_step)
    with ema.applied_to(unet.parameters()):    # sample or save with the averaged weights
        ...
    backup["ema"] = ema.state_dict()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EMA:
    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.999, update_step_interval: int = 1, on_cpu: bool = False,
    ) -> None:
        if not 0 < decay < 1 or update_step_interval < 1:
            raise ValueError(f"training.ema: decay must be in (0, 1) and update_step_interval >= 1, got {decay}, {update_step_interval}")
        self.decay, self.update_step_interval, self.on_cpu = decay, update_step_interval, on_cpu
        self.averages = [self._copy(p) for p in parameters]

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(device="cpu" if self.on_cpu else p.device, dtype=torch.float32, copy=True)

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """Move the averages after optimizer step `step` (0-based); True when they moved."""
        if (step + 1) % self.update_step_interval:
            return False
        weight = 1.0 - self.current_decay(step)
        parameters = list(parameters)
        self._check(parameters)
        for average, p in zip(self.averages, parameters):
            if p.requires_grad:  # a part whose training stopped keeps its average
                average.lerp_(p.detach().to(average.device, torch.float32), weight)
        return True

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self._check(parameters)
        for average, p in zip(self.averages, parameters):
            p.copy_(average.to(p.device, p.dtype))

    @contextmanager
    def applied_to(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """The averaged weights inside the block, the trained ones (restored exactly) after it."""
        parameters = list(parameters)
        stored = [p.detach().to("cpu", copy=True) for p in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(stored, parameters):
                    p.copy_(saved.to(p.device))

    def _check(self, parameters: list[torch.nn.Parameter]) -> None:
        if len(parameters) != len(self.averages) or any(a.shape != p.shape for a, p in zip(self.averages, parameters)):
            raise ValueError("EMA: the parameters differ from the ones the average was made of (same model, same order?)")

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "update_step_interval": self.update_step_interval, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averages = state["averages"]
        if len(averages) != len(self.averages) or any(a.shape != b.shape for a, b in zip(averages, self.averages)):
            raise ValueError("EMA backup does not fit this model: its averages have other shapes")
        self.averages = [a.to(device=b.device, dtype=torch.float32) for a, b in zip(averages, self.averages)]
