"""Which images each training step sees: OneTrainer's REPEATS/SAMPLES epoch semantics, seeded.

Per epoch a concept of N items gives k samples: floor(N x balancing) with REPEATS, int(balancing)
with SAMPLES. Epoch e takes positions [e*k, e*k+k) mod N of the concept's sorted items, so a
fractional concept (5000 regularization images x 0.0072 = 36 an epoch) is walked through in order
across epochs and every item is eventually seen. The epoch's samples are shuffled with a seed made
of (seed, epoch), so a resumed run sees the same order; they are cut into batches, and samples
that do not fill a batch (on every process) are dropped. Validation and disabled concepts give
nothing.

With `group_of` (aspect-ratio buckets: sample -> bucket key) a batch never mixes groups: the
shuffled samples are split by group, each group cut into batches, its leftovers dropped, and the
batches of all groups shuffled together (seeded by (seed, epoch)). Samples per epoch stay the
OneTrainer counts; the batch count can then change from epoch to epoch (`batches_in_epoch`).

    concepts = [ConceptItems("person", person_ids, 1.0), ConceptItems("reg", reg_ids, 0.0072)]
    sampler = EpochSampler(concepts, batch_size=1, seed=42)
    while sampler.position.epoch < epochs:
        for batch in sampler:        # the rest of the current epoch: lists of Sample
            ...
        state = sampler.state_dict() # {"epoch": ..., "batch": ...}: the next batch to train on
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple


class Sample(NamedTuple):
    concept: str
    item: str


class Position(NamedTuple):
    """The next batch to train on: its epoch and its index within the epoch (this process)."""

    epoch: int
    batch: int


@dataclass(frozen=True)
class ConceptItems:
    """One concept's items (ids, e.g. relative paths; sorted here) and how many an epoch takes."""

    name: str
    items: Sequence[str]
    balancing: float = 1.0
    strategy: Literal["REPEATS", "SAMPLES"] = "REPEATS"
    enabled: bool = True
    validation: bool = False
    sorted_items: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.balancing, bool) or not isinstance(self.balancing, (int, float)) or not self.balancing > 0:
            raise ValueError(
                f"concept {self.name!r}: balancing must be a number > 0, got {self.balancing!r} "
                "(resolve 'auto' to a number before building the sampler)"
            )
        if self.strategy not in ("REPEATS", "SAMPLES"):
            raise ValueError(f"concept {self.name!r}: balancing_strategy must be REPEATS or SAMPLES, got {self.strategy!r}")
        object.__setattr__(self, "sorted_items", tuple(sorted(self.items)))

    @property
    def samples_per_epoch(self) -> int:
        if not self.enabled or self.validation or not self.sorted_items:
            return 0
        if self.strategy == "SAMPLES":
            return int(self.balancing)
        return math.floor(len(self.sorted_items) * self.balancing)

    def epoch_items(self, epoch: int) -> list[str]:
        """Positions [epoch*k, epoch*k + k) mod N of the sorted items."""
        k, n = self.samples_per_epoch, len(self.sorted_items)
        return [self.sorted_items[(epoch * k + i) % n] for i in range(k)]


def epoch_samples(concepts: Sequence[ConceptItems], epoch: int, seed: int) -> list[Sample]:
    """Every sample of one epoch (all processes), shuffled with a seed made of (seed, epoch)."""
    samples = [Sample(c.name, item) for c in concepts for item in c.epoch_items(epoch)]
    # A str seed is hashed with SHA-512 by `random`: the same order in every process and Python run.
    random.Random(f"likeness-epoch:{seed}:{epoch}").shuffle(samples)
    return samples


def batches_per_epoch(
    concepts: Sequence[ConceptItems], batch_size: int, world_size: int = 1, gradient_accumulation_steps: int = 1,
) -> int:
    """Batches each process trains on per epoch (whole optimizer steps only)."""
    samples = sum(c.samples_per_epoch for c in concepts)
    batches = samples // (batch_size * world_size)
    return batches - batches % gradient_accumulation_steps


def steps_per_epoch(
    concepts: Sequence[ConceptItems], batch_size: int, world_size: int = 1, gradient_accumulation_steps: int = 1,
) -> int:
    """Optimizer steps per epoch: 36 person images x 1.0 + 5000 x 0.0072 at batch 1 -> 72."""
    return batches_per_epoch(concepts, batch_size, world_size, gradient_accumulation_steps) // gradient_accumulation_steps


class EpochSampler:
    """Batches of `Sample`s for one process, epoch after epoch, from a resumable `position`."""

    def __init__(
        self,
        concepts: Sequence[ConceptItems],
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        gradient_accumulation_steps: int = 1,
        group_of: Callable[[Sample], str] | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError("batch_size, world_size and gradient_accumulation_steps must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        names = [c.name for c in concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        self.concepts = list(concepts)
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.group_of, self.accumulation = group_of, gradient_accumulation_steps
        # Without groups, every epoch's batch count; with groups, an upper bound (batches_in_epoch is exact).
        self.num_batches = batches_per_epoch(self.concepts, batch_size, world_size, gradient_accumulation_steps)
        if self.num_batches == 0:
            samples = sum(c.samples_per_epoch for c in self.concepts)
            raise ValueError(
                f"an epoch has {samples} training samples, too few for one optimizer step of "
                f"training.batch_size {batch_size} x {world_size} process(es) x "
                f"training.gradient_accumulation_steps {gradient_accumulation_steps}: "
                "add images, raise a concept's balancing or lower the batch size"
            )
        self.position = Position(0, 0)

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int) -> list[list[Sample]]:
        """This process's batches of `epoch`: global batch i is samples [i*B*W, (i+1)*B*W), rank r its r-th slice."""
        samples = epoch_samples(self.concepts, epoch, self.seed)
        b, w = self.batch_size, self.world_size
        if self.group_of is not None:
            return [batch[self.rank * b:(self.rank + 1) * b] for batch in self._grouped(samples, epoch)]
        return [samples[(i * w + self.rank) * b:(i * w + self.rank + 1) * b] for i in range(self.num_batches)]

    def _grouped(self, samples: list[Sample], epoch: int) -> list[list[Sample]]:
        """Global batches (B x W samples) of one group each, leftovers per group dropped, order shuffled."""
        groups: dict[str, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(self.group_of(sample), []).append(sample)
        size = self.batch_size * self.world_size
        batches = [group[i:i + size] for group in groups.values() for i in range(0, len(group) - size + 1, size)]
        random.Random(f"likeness-groups:{self.seed}:{epoch}").shuffle(batches)
        return batches[:len(batches) - len(batches) % self.accumulation]  # whole optimizer steps only

    def batches_in_epoch(self, epoch: int) -> int:
        return self.num_batches if self.group_of is None else len(self.batches(epoch))

    def total_steps(self, epochs: int) -> int:
        """Optimizer steps of `epochs` epochs (with groups the batch count varies by epoch)."""
        if self.group_of is None:
            return self.num_batches // self.accumulation * epochs
        return sum(self.batches_in_epoch(e) // self.accumulation for e in range(epochs))

    def __iter__(self) -> Iterator[list[Sample]]:
        """The rest of the current epoch; `position` always names the next batch to train on."""
        epoch, start = self.position
        batches = self.batches(epoch)
        for index in range(start, len(batches)):
            # Advance before yielding, so a backup taken while this batch trains resumes after it.
            self.position = Position(epoch, index + 1) if index + 1 < len(batches) else Position(epoch + 1, 0)
            yield batches[index]
        if start >= len(batches):
            self.position = Position(epoch + 1, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        count = self.batches_in_epoch(epoch) if epoch >= 0 else 0
        if epoch < 0 or not 0 <= batch <= count:
            raise ValueError(f"sampler position {state} is outside an epoch of {count} batches")
        self.position = Position(epoch, batch)


def bucketed_sampler(
    concepts: Sequence[ConceptItems], buckets: Mapping[str, str], batch_size: int, seed: int, world_size: int = 1,
    rank: int = 0, gradient_accumulation_steps: int = 1,
) -> EpochSampler:
    """The training run's sampler: with more than one aspect-ratio bucket (item -> bucket key) among
    the items, a batch never mixes buckets; with one, no grouping (a fixed batch count).

    The balance stage plans with this very function, so its step count is the trainer's."""
    several = len({buckets[item] for c in concepts for item in c.sorted_items}) > 1
    group_of = (lambda sample: buckets[sample.item]) if several else None
    return EpochSampler(concepts, batch_size, seed, world_size, rank, gradient_accumulation_steps, group_of=group_of)
