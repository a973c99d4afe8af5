"""Which torch device `settings.run.device` means on this machine.

    device = resolve_device("auto")   # cuda if there is one, else mps, else cpu
"""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error naming it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"run.device = {name!r} but torch sees no CUDA device here: set run.device = 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("run.device = 'mps' but MPS is not available here: set run.device = 'auto' or 'cpu'")
    return torch.device(name)
