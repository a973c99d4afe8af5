"""The non-finite guard: a NaN or inf loss or gradient never reaches the weights.

Without the fused back pass the gradients are checked (after averaging across processes) before the
optimizer step; a bad step is skipped, so the weights stay those of the last good step. With the
fused back pass each parameter steps inside backward: the loss is checked before backward, and each
gradient in the hook before its parameter steps. When a gradient turns bad after some parameters
have stepped, the run goes back to its last backup (or its start) and goes on from there. After
`training.max_nonfinite_steps` such events the run stops with an error naming the step and the
likely causes.

    guard = NonFiniteGuard(settings.training.max_nonfinite_steps, describe_causes, log)
    if not all_finite(p.grad for p in params):
        guard.record(step, "gradient", "update skipped")   # raises NonFiniteError at the limit
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class NonFiniteError(RuntimeError):
    """Too many non-finite steps: training diverged."""


class RollBack(Exception):
    """Raised out of an epoch when the fused back pass already applied part of a bad step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"step {step}: roll back to the last backup")
        self.step = step


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (one device sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    """Counts non-finite steps and stops the run after `limit` of them."""

    def __init__(self, limit: int, describe: Callable[[], str], log: Callable[[str], None]) -> None:
        self.limit, self.describe, self.log = limit, describe, log
        self.events: list[int] = []

    def record(self, step: int, what: str, action: str) -> None:
        """Log one non-finite step (`what` was bad; `action` taken) and raise after `limit` of them."""
        self.events.append(step)
        self.log(f"warning: step {step + 1}: non-finite {what}; {action} "
                 f"({len(self.events)} of at most {self.limit} such steps)")
        if len(self.events) >= self.limit:
            steps = ", ".join(str(s + 1) for s in self.events)
            raise NonFiniteError(
                f"training stopped: non-finite {what} at step {step + 1} ({len(self.events)} non-finite steps: {steps}). "
                f"Likely causes: {self.describe()}. Raise training.max_nonfinite_steps to tolerate more.")


def likely_causes(learning_rates: dict[str, float], train_dtype: str, weight_dtypes: dict[str, str]) -> str:
    """The usual suspects, with this run's values: a learning rate too high, fp16/bf16 overflow."""
    lrs = ", ".join(f"{part} {lr:g}" for part, lr in learning_rates.items())
    causes = [f"a learning rate too high (now {lrs}: try a tenth)"]
    if train_dtype == "float16" or "float16" in weight_dtypes.values():
        causes.append("float16 overflow (training.train_dtype / weight_dtype float16: use bfloat16, same memory, "
                      "the range of float32)")
    elif train_dtype == "bfloat16" or "bfloat16" in weight_dtypes.values():
        causes.append("bfloat16 overflow or rounding (try training.train_dtype = float32 to tell)")
    causes.append("a damaged latent cache or image (re-run `likeness prepare`)")
    return "; ".join(causes)
