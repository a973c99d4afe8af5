"""The balancing report and the trainer agree: held-out class-prior images leave before the plan.

The plan (tasks/balance.py) and the trainer (trainer/train_data.py: trainable_ids -> concept_items ->
epoch_sampler.bucketed_sampler) are run on the same ids; their step counts must be equal, on the
reference run (36 photos vs 5000 class images, rows only) and on the demo profile.
"""

import json

import pandas as pd
import pytest

from likeness.holdout import heldout_ids
from likeness.profiles import load_profile
from likeness.settings import Settings
from likeness.tasks.balance import plan_rows
from likeness.trainer.epoch_sampler import bucketed_sampler
from likeness.trainer.train_data import TrainData, concept_items, trainable_ids
from likeness.workspace import Workspace


def _rows(counts: dict[str, int], buckets: tuple[str, ...] = ("1024x1024",)) -> list[dict]:
    return [{"id": f"{name}/img{i:05d}", "concept": name, "bucket": buckets[i % len(buckets)]}
            for name, n in counts.items() for i in range(n)]


def _trainer_steps(rows: list[dict], plan, settings: Settings) -> int:
    """What the trainer counts: the manifest the plan leads to, minus held-out images, its sampler."""
    by_name = {c.name: c for c in plan.concepts}
    roles = {c.name: (c.role, c.validation) for c in settings.concepts}
    manifest = pd.DataFrame([{"id": r["id"], "concept": r["concept"], "role": roles[r["concept"]][0],
                              "validation": roles[r["concept"]][1], "balancing": by_name[r["concept"]].balancing,
                              "balancing_strategy": by_name[r["concept"]].balancing_strategy, "loss_weight": 1.0}
                             for r in rows])
    trained = trainable_ids(manifest, settings)
    sampler = bucketed_sampler(concept_items(trained), {r["id"]: r["bucket"] for r in rows},
                               settings.training.batch_size, settings.run.seed,
                               gradient_accumulation_steps=settings.training.gradient_accumulation_steps)
    return sampler.total_steps(settings.training.epochs)


def test_reference_run_36_photos_vs_5000_class_images():
    settings = Settings()  # the reference run: 200 epochs, batch 1, 8 class-prior images held out
    rows = _rows({"person": 36, "regularization": 5000})
    plan = plan_rows(rows, settings.concepts, settings.training,
                     class_prior_images=settings.evaluation.class_prior_images)
    reg = plan.concepts[1]
    assert (reg.images, reg.held_out, reg.trained) == (5000, 8, 4992)
    assert reg.balancing == 0.0073 and reg.samples_per_epoch == 36  # auto on the 4992 trained: floor(4992 x 0.0073)
    assert (plan.steps_per_epoch, plan.total_steps) == (72, 14_400)
    assert _trainer_steps(rows, plan, settings) == plan.total_steps
    assert plan.estimated_seconds == pytest.approx(14_400 / 1.13)
    assert "8 regularization image(s) are held out" in plan.markdown()


def test_demo_profile_report_equals_trainer():
    settings = load_profile("demo-cpu")
    rows = _rows({"person": 8, "regularization": 12}, buckets=("64x64",))  # what `likeness demo` writes
    plan = plan_rows(rows, settings.concepts, settings.training,
                     class_prior_images=settings.evaluation.class_prior_images)
    assert plan.concepts[1].trained == 8 and plan.concepts[1].balancing == 1.0
    assert (plan.steps_per_epoch, plan.total_steps) == (16, 64)  # was 64 planned, 52 trained
    assert _trainer_steps(rows, plan, settings) == plan.total_steps


@pytest.mark.parametrize("batch_size, accumulation", [(1, 1), (3, 1), (2, 2)])
def test_bucketed_batches_and_accumulation_count_as_the_trainer(batch_size, accumulation):
    settings = Settings.model_validate({"training": {"batch_size": batch_size, "epochs": 5,
                                                     "gradient_accumulation_steps": accumulation},
                                        "optimizer": {"fused_back_pass": accumulation == 1}})
    rows = _rows({"person": 23, "regularization": 300}, buckets=("1024x1024", "896x1152", "1152x896"))
    plan = plan_rows(rows, settings.concepts, settings.training, class_prior_images=8)
    assert plan.total_steps == _trainer_steps(rows, plan, settings) > 0


def test_prepared_workspace_report_equals_train_data(train_settings):
    """End to end on real files: the balance stage's table and the TrainData the loop builds."""
    settings = train_settings(evaluation={"class_prior_images": 2}, masks={"enabled": False})  # 2 of the 4 class images
    ws = Workspace.from_settings(settings)
    extra = json.loads(ws.table("balance").read_text())["extra"]
    data = TrainData(ws, settings)
    assert len(heldout_ids(data.manifest, 2)) == 2
    # 3 photos; auto on the 2 class images trained: 1.5 -> 3 samples. Before: 0.75 of 4 planned 6 steps, trained 4.
    assert extra["steps_per_epoch"] == 6 and extra["total_steps"] == data.total_steps(settings.training.epochs, 1) == 12
