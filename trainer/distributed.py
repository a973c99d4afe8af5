"""Several training processes (accelerate launch / torchrun): this process's rank, its device, and
the gradient averaging that replaces DistributedDataParallel.

Plain all-reduce after backward instead of wrapping models in DDP: the parts being trained change
during a run (`stop_training_after`), which DDP does not allow without searching for unused
parameters every step, and the state dicts keep their plain keys. One process (the default) needs
no process group at all.

    procs = start_processes(settings.run.device)     # Processes(world_size, rank, device)
    loss.backward(); average_gradients(params, procs.world_size); optimizer.step()
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from likeness.models.devices import resolve_device


@dataclass
class Processes:
    world_size: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_processes(device_name: str) -> Processes:
    """One process by default; under `accelerate launch` / torchrun, this process's rank and device."""
    device = resolve_device(device_name)
    from accelerate import PartialState  # reads the launcher's environment, starts gloo / NCCL

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1 and device.type == "cuda":
        device = state.device  # cuda:<local rank>
    return Processes(state.num_processes, state.process_index, device)


def average_gradients(parameters: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce each gradient to the mean over processes (a missing one counts as zero)."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world_size)


def mean_over_processes(value: float, procs: Processes) -> float:
    if procs.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=procs.device)
    dist.all_reduce(tensor)
    return tensor.item() / procs.world_size


def weights_digest(parameters: Sequence[torch.Tensor]) -> str:
    """sha256 of the parameters' bytes, in order (the same weights give the same digest)."""
    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digests_agree(parameters: Sequence[torch.Tensor], procs: Processes) -> str:
    """The weights' digest, checked to be the same on every process; raises if they diverged."""
    mine = weights_digest(parameters)
    if procs.world_size == 1:
        return mine
    every: list[str | None] = [None] * procs.world_size
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise RuntimeError(f"the processes ended with different weights ({every}): gradients were not averaged alike")
    return mine
