"""Stage 5, balancing: resolve `balancing = "auto"` and plan the epochs, steps and duration.

`auto` on a regularization concept = subject images / its images, rounded *up* at the fourth
decimal (36 / 5000 -> 0.0072), so that floor(N x balancing) reaches the subject count: OneTrainer
gives a REPEATS concept floor(N x balancing) samples an epoch (SAMPLES: int(balancing)), and a
ratio rounded down would lose images. Explicit values are kept.

Steps per epoch = the epoch's samples // batch size (leftovers are dropped, as the epoch sampler
does); total steps = that x epochs; the duration uses the it/s measured by a previous training
run in this workspace (`reports/speed.json`) or else `training.iterations_per_second`.

Table rows (one per concept): id (= concept), role, images, balancing, balancing_strategy,
samples_per_epoch, loss_weight, validation; `extra` holds the totals.

    plan = plan_training({"person": 36, "regularization": 5000}, settings.concepts, settings.training)
    plan.steps_per_epoch  # 72
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from likeness.content import HashIndex, digest_parts
from likeness.files import write_atomic
from likeness.settings import Concept, TrainingSettings
from likeness.stages import Counts, PrepareError, StageResult, load_rows, write_table
from likeness.tasks.common import StagePolicy
from likeness.trainer.epoch_sampler import ConceptItems
from likeness.workspace import Workspace

BALANCE_VERSION = 1
DECIMALS = 4


def auto_balancing(subject_images: int, concept_images: int) -> float:
    """subject / concept images rounded up at the fourth decimal; floor(N x result) >= subject."""
    if concept_images <= 0 or subject_images <= 0:
        raise PrepareError(f"balancing 'auto' needs images on both sides (subject {subject_images}, concept {concept_images})")
    scale = 10 ** DECIMALS
    steps = math.ceil(Fraction(subject_images, concept_images) * scale)
    while math.floor(concept_images * (steps / scale)) < subject_images:  # float error in N x b
        steps += 1
    return steps / scale


def samples_per_epoch(images: int, balancing: float, strategy: str = "REPEATS") -> int:
    """As the trainer's epoch sampler counts them (one formula for both)."""
    return ConceptItems("c", [str(i) for i in range(images)], balancing, strategy).samples_per_epoch


@dataclass(frozen=True)
class ConceptPlan:
    name: str
    role: str
    images: int
    balancing: float
    balancing_strategy: str
    samples_per_epoch: int
    loss_weight: float
    validation: bool


@dataclass(frozen=True)
class TrainingPlan:
    concepts: list[ConceptPlan]
    batch_size: int
    epochs: int
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    iterations_per_second: float
    speed_source: str
    estimated_seconds: float

    def rows(self) -> list[dict]:
        return [asdict(c) for c in self.concepts]

    def summary(self) -> str:
        return (f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in {self.epochs} epochs, about "
                f"{format_duration(self.estimated_seconds)} at {self.iterations_per_second:g} it/s ({self.speed_source})")

    def markdown(self) -> str:
        lines = ["# Balancing", "", "| concept | role | images | balancing | samples / epoch |", "|---|---|---|---|---|"]
        lines += [f"| {c.name} | {c.role}{' (validation)' if c.validation else ''} | {c.images} | {c.balancing:g} "
                  f"| {c.samples_per_epoch} |" for c in self.concepts]
        lines += ["", f"Batch size {self.batch_size}: {self.summary()}."]
        return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def plan_training(counts: dict[str, int], concepts: list[Concept], training: TrainingSettings,
                  measured_its: float | None = None) -> TrainingPlan:
    """Resolve every enabled concept's balancing and count samples, steps and time."""
    enabled = [c for c in concepts if c.enabled]
    subject = sum(counts.get(c.name, 0) for c in enabled if c.role == "subject" and not c.validation)
    plans = []
    for c in enabled:
        n = counts.get(c.name, 0)
        balancing = auto_balancing(subject, n) if c.balancing == "auto" else float(c.balancing)
        per_epoch = 0 if c.validation else samples_per_epoch(n, balancing, c.balancing_strategy)
        plans.append(ConceptPlan(c.name, c.role, n, balancing, c.balancing_strategy, per_epoch, c.loss_weight, c.validation))
    samples = sum(p.samples_per_epoch for p in plans)
    steps = samples // training.batch_size
    its, source = (measured_its, "measured") if measured_its else (training.iterations_per_second, "configured")
    total = steps * training.epochs
    return TrainingPlan(plans, training.batch_size, training.epochs, samples, steps, total, its, source, total / its)


def read_measured_speed(ws: Workspace) -> float | None:
    try:
        value = float(json.loads(ws.measured_speed.read_text())["iterations_per_second"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value > 0 else None


# --- the stage -------------------------------------------------------------------------------


def _keyed_training(training: TrainingSettings) -> dict:
    return training.model_dump(mode="json", include={"epochs", "batch_size", "iterations_per_second"})


def balance_key(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace) -> str:
    keyed = [c.model_dump(mode="json", include={"name", "role", "enabled", "balancing", "balancing_strategy",
                                                 "loss_weight", "validation"}) for c in concepts]
    counts = sorted(Counter(row["concept"] for row in load_rows(resize)).items())  # all balancing reads of the images
    return digest_parts("balance", BALANCE_VERSION, counts, keyed, _keyed_training(training),
                        read_measured_speed(ws), str(ws.root))


def balance_stage(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace,
                  index: HashIndex) -> tuple[StageResult, TrainingPlan]:
    counts = Counter(row["concept"] for row in load_rows(resize))
    plan = plan_training(dict(counts), concepts, training, read_measured_speed(ws))
    if plan.steps_per_epoch == 0:
        raise PrepareError("an epoch has no training step: add images, raise a concept's balancing, or lower training.batch_size")
    write_atomic(ws.report("balance.md"), plan.markdown())
    extra = {k: v for k, v in asdict(plan).items() if k != "concepts"}
    result = write_table(ws, "balance", BALANCE_VERSION, [{"id": r["name"], **r} for r in plan.rows()],
                         Counts(processed=len(plan.concepts)), extra=extra)
    index.save()
    return result, plan


# --- Prefect task ----------------------------------------------------------------------------


@task(name="balance-concepts", cache_policy=StagePolicy(key_fn=balance_key))
def balance_concepts(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace) -> StageResult:
    """Balancing per concept (`auto` resolved), samples and steps per epoch, total steps, duration."""
    result, plan = balance_stage(resize, concepts, training, ws, HashIndex(ws.hash_index))
    create_table_artifact(plan.rows(), key="balancing", description=plan.summary())
    get_run_logger().info("balancing:\n%s", plan.markdown())
    return result
