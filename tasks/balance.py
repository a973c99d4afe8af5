"""Stage 5, balancing: resolve `balancing = "auto"` and plan the epochs, steps and duration.

First the class-prior images leave: `evaluation.class_prior_images` regularization images per
concept are held out of training (likeness/holdout.py, the same ids the trainer drops), and every
count below is of the images actually trained on.

`auto` on a regularization concept = subject images / its trained images, rounded *up* at the
fourth decimal (36 / 5000 -> 0.0072), so that floor(N x balancing) reaches the subject count:
OneTrainer gives a REPEATS concept floor(N x balancing) samples an epoch (SAMPLES: int(balancing)),
and a ratio rounded down would lose images. Explicit values are kept.

Steps come from the trainer's own epoch sampler (`epoch_sampler.bucketed_sampler`, one process):
samples // batch size per epoch, leftovers dropped, whole gradient-accumulation steps; with
aspect-ratio buckets a batch never mixes buckets, so the count is summed epoch by epoch. The
duration uses the it/s measured by a previous training run in this workspace
(`reports/speed.json`) or else `training.iterations_per_second`.

Table rows (one per concept): id (= concept), role, images, held_out, trained, balancing,
balancing_strategy, samples_per_epoch, loss_weight, validation; `extra` holds the totals.

    plan = plan_training({"person": 36, "regularization": 5000}, settings.concepts, settings.training)
    plan.steps_per_epoch  # 72
    plan = plan_rows(load_rows(resize, ws), settings.concepts, settings.training, class_prior_images=8)
    plan.steps_per_epoch  # 72 as well: 36 + 4992 x 0.0073 (auto on the 4992 images trained)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from likeness.content import HashIndex, digest_parts
from likeness.files import write_atomic
from likeness.settings import Concept, TrainingSettings
from likeness.holdout import heldout_of
from likeness.stages import Counts, PrepareError, Row, StageResult, load_rows, write_table
from likeness.tasks.common import StagePolicy
from likeness.trainer.epoch_sampler import ConceptItems, bucketed_sampler
from likeness.workspace import Workspace

BALANCE_VERSION = 2  # 2: class-prior images held out before planning; held_out / trained columns
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
    held_out: int = 0  # class-prior images, never trained on
    trained: int = 0  # images - held_out (0 for a validation concept)


@dataclass(frozen=True)
class TrainingPlan:
    concepts: list[ConceptPlan]
    batch_size: int
    epochs: int
    samples_per_epoch: int
    steps_per_epoch: int  # the first epoch's (with buckets the count may vary by epoch)
    total_steps: int
    iterations_per_second: float
    speed_source: str
    estimated_seconds: float
    gradient_accumulation_steps: int = 1

    def rows(self) -> list[dict]:
        return [asdict(c) for c in self.concepts]

    def summary(self) -> str:
        return (f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in {self.epochs} epochs, about "
                f"{format_duration(self.estimated_seconds)} at {self.iterations_per_second:g} it/s ({self.speed_source})")

    def markdown(self) -> str:
        lines = ["# Balancing", "", "| concept | role | images | held out | trained | balancing | samples / epoch |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {c.name} | {c.role}{' (validation)' if c.validation else ''} | {c.images} | {c.held_out} "
                  f"| {c.trained} | {c.balancing:g} | {c.samples_per_epoch} |" for c in self.concepts]
        held = sum(c.held_out for c in self.concepts)
        if held:
            lines += ["", f"{held} regularization image(s) are held out of training to measure class-prior loss "
                          "(evaluation.class_prior_images); balancing and steps count the images trained on."]
        lines += ["", f"Batch size {self.batch_size}: {self.summary()}."]
        return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def plan_training(counts: dict[str, int], concepts: list[Concept], training: TrainingSettings,
                  measured_its: float | None = None) -> TrainingPlan:
    """The plan from image counts alone (no hold-out, one bucket): `plan_rows` on made-up ids."""
    rows = [{"id": f"{name}/{i}", "concept": name, "bucket": "1x1"} for name, n in counts.items() for i in range(n)]
    return plan_rows(rows, concepts, training, class_prior_images=0, measured_its=measured_its)


def plan_rows(rows: list[Row], concepts: list[Concept], training: TrainingSettings, *, class_prior_images: int,
              measured_its: float | None = None) -> TrainingPlan:
    """Hold out the class-prior images, resolve every enabled concept's balancing on the images left,
    and count samples, steps (the trainer's sampler) and time. `rows`: id, concept, bucket."""
    enabled = [c for c in concepts if c.enabled]
    ids: dict[str, list[str]] = {c.name: [] for c in enabled}
    for row in rows:
        ids.setdefault(row["concept"], []).append(row["id"])
    held = heldout_of({c.name: ids[c.name] for c in enabled if c.role == "regularization" and not c.validation},
                      class_prior_images)
    trained = {c.name: [] if c.validation else [i for i in ids[c.name] if i not in held] for c in enabled}
    subject = sum(len(trained[c.name]) for c in enabled if c.role == "subject")
    plans, items = [], []
    for c in enabled:
        found, n = len(ids[c.name]), len(trained[c.name])
        # A validation concept is never trained on; its 'auto' is resolved on all its images, for the table.
        balancing = auto_balancing(subject, found if c.validation else n) if c.balancing == "auto" else float(c.balancing)
        per_epoch = samples_per_epoch(n, balancing, c.balancing_strategy)
        plans.append(ConceptPlan(c.name, c.role, found, balancing, c.balancing_strategy, per_epoch, c.loss_weight,
                                 c.validation, 0 if c.validation else found - n, n))
        if n:
            items.append(ConceptItems(c.name, trained[c.name], balancing, c.balancing_strategy))
    steps_first, total = _steps(items, {row["id"]: row.get("bucket", "") for row in rows}, training)
    its, source = (measured_its, "measured") if measured_its else (training.iterations_per_second, "configured")
    return TrainingPlan(plans, training.batch_size, training.epochs, sum(p.samples_per_epoch for p in plans), steps_first,
                        total, its, source, total / its, training.gradient_accumulation_steps)


def _steps(items: list[ConceptItems], buckets: dict[str, str], training: TrainingSettings) -> tuple[int, int]:
    """(steps of the first epoch, steps of the run) as the trainer's sampler counts them; (0, 0) for none."""
    try:
        sampler = bucketed_sampler(sorted(items, key=lambda c: c.name), buckets, training.batch_size, seed=0,
                                   gradient_accumulation_steps=training.gradient_accumulation_steps)
    except ValueError:  # not one optimizer step an epoch: the stage says what to do
        return 0, 0
    return sampler.batches_in_epoch(0) // sampler.accumulation, sampler.total_steps(training.epochs)


def read_measured_speed(ws: Workspace) -> float | None:
    try:
        value = float(json.loads(ws.measured_speed.read_text())["iterations_per_second"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value > 0 else None


# --- the stage -------------------------------------------------------------------------------


def _keyed_training(training: TrainingSettings) -> dict:
    return training.model_dump(mode="json", include={"epochs", "batch_size", "iterations_per_second",
                                                     "gradient_accumulation_steps"})


def _planned_rows(resize: StageResult, ws: Workspace) -> list[Row]:
    return [{"id": row["id"], "concept": row["concept"], "bucket": row.get("bucket", "")} for row in load_rows(resize, ws)]


def balance_key(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace,
                class_prior_images: int = 0) -> str:
    keyed = [c.model_dump(mode="json", include={"name", "role", "enabled", "balancing", "balancing_strategy",
                                                 "loss_weight", "validation"}) for c in concepts]
    rows = sorted((r["id"], r["concept"], r["bucket"]) for r in _planned_rows(resize, ws))  # all balancing reads of them
    return digest_parts("balance", BALANCE_VERSION, rows, keyed, _keyed_training(training), class_prior_images,
                        read_measured_speed(ws))


def balance_stage(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace,
                  index: HashIndex, *, class_prior_images: int) -> tuple[StageResult, TrainingPlan]:
    """The plan on the images trained: `class_prior_images` per regularization concept held out first."""
    plan = plan_rows(_planned_rows(resize, ws), concepts, training, class_prior_images=class_prior_images,
                     measured_its=read_measured_speed(ws))
    if plan.total_steps == 0:
        raise PrepareError("an epoch has no training step: add images, raise a concept's balancing, or lower training.batch_size")
    write_atomic(ws.report("balance.md"), plan.markdown())
    extra = {k: v for k, v in asdict(plan).items() if k != "concepts"}
    result = write_table(ws, "balance", BALANCE_VERSION, [{"id": r["name"], **r} for r in plan.rows()],
                         Counts(processed=len(plan.concepts)), extra=extra)
    index.save()
    return result, plan


# --- Prefect task ----------------------------------------------------------------------------


@task(name="balance-concepts", cache_policy=StagePolicy(key_fn=balance_key))
def balance_concepts(resize: StageResult, concepts: list[Concept], training: TrainingSettings, ws: Workspace,
                     class_prior_images: int = 0) -> StageResult:
    """Balancing per concept (`auto` resolved), samples and steps per epoch, total steps, duration."""
    result, plan = balance_stage(resize, concepts, training, ws, ws.hashes(),
                                 class_prior_images=class_prior_images)
    create_table_artifact(plan.rows(), key="balancing", description=plan.summary())
    get_run_logger().info("balancing:\n%s", plan.markdown())
    return ws.portable(result)
