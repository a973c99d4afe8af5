"""The "every N MINUTE / EPOCH / STEP" timers of training: when to sample, save and back up.

STEP fires after every N-th optimizer step, EPOCH at the end of every N-th epoch (OneTrainer:
"at the start of epochs divisible by N, not 0", the same moment), MINUTE when N minutes have
passed since it last fired (or since training started), NEVER never. `skip_first` suppresses
firings while the count of the timer's unit is still <= skip_first (saving.skip_first: no saves
during the first N units). STEP and EPOCH timers depend only on the counts, so a resumed run fires
exactly where an uninterrupted one would; a MINUTE timer restarts with the process.

    saves = Interval(settings.saving.every, settings.saving.unit, settings.saving.skip_first)
    if saves.after_step(global_step): ...        # checked after every optimizer step
    if saves.after_epoch(epochs_done): ...       # checked at the end of every epoch
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Interval:
    """One timer; `after_step` and `after_epoch` say whether it fires at that point."""

    def __init__(self, every: int, unit: str, skip_first: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if unit not in ("NEVER", "MINUTE", "EPOCH", "STEP"):
            raise ValueError(f"unit must be NEVER, MINUTE, EPOCH or STEP, got {unit!r}")
        if every < 1 or skip_first < 0:
            raise ValueError(f"every must be >= 1 and skip_first >= 0, got {every}, {skip_first}")
        self.every, self.unit, self.skip_first, self.clock = every, unit, skip_first, clock
        self.started = self.last = clock()

    def after_step(self, step: int) -> bool:
        """After optimizer step `step` (1-based count of steps done): STEP and MINUTE timers."""
        if self.unit == "STEP":
            return step % self.every == 0 and step > self.skip_first
        if self.unit == "MINUTE":
            now = self.clock()
            if now - self.last >= 60.0 * self.every and (now - self.started) / 60.0 > self.skip_first:
                self.last = now
                return True
        return False

    def after_epoch(self, epochs_done: int) -> bool:
        """At the end of an epoch (`epochs_done` epochs complete): EPOCH timers."""
        return self.unit == "EPOCH" and epochs_done % self.every == 0 and epochs_done > self.skip_first
