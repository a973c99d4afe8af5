"""Balancing: `auto` rounds up at the fourth decimal so an epoch sees as many class images as photos."""

import json
import math

import pytest

from likeness.settings import CaptionSource, Concept, TrainingSettings
from likeness.tasks.balance import auto_balancing, plan_training, read_measured_speed, samples_per_epoch
from likeness.workspace import Workspace


def test_reference_run_ratio():
    assert auto_balancing(36, 5000) == 0.0072
    assert math.floor(5000 * 0.0072) == 36
    assert samples_per_epoch(5000, 0.0072) == 36


@pytest.mark.parametrize("subject, images", [(36, 5000), (11, 5000), (10, 3), (1, 7), (99, 100), (7, 1_000_000), (13, 29)])
def test_auto_rounds_up_and_never_loses_a_sample(subject, images):
    value = auto_balancing(subject, images)
    assert value * 10_000 == pytest.approx(round(value * 10_000))  # four decimals
    assert value >= subject / images and value - subject / images < 2e-4
    assert samples_per_epoch(images, value) >= subject


def _concepts(reg_balancing="auto", **reg):
    text = CaptionSource(source="text", text="man")
    return [Concept(name="person", path="p", caption=text),
            Concept(name="reg", path="r", role="regularization", balancing=reg_balancing, caption=text, **reg)]


def test_plan_of_the_reference_run():
    plan = plan_training({"person": 36, "reg": 5000}, _concepts(), TrainingSettings())
    assert [c.balancing for c in plan.concepts] == [1.0, 0.0072]
    assert [c.samples_per_epoch for c in plan.concepts] == [36, 36]
    assert (plan.steps_per_epoch, plan.total_steps) == (72, 14_400)
    assert plan.estimated_seconds == pytest.approx(14_400 / 1.13)
    assert "72 steps per epoch" in plan.markdown() and "3 h 32 min" in plan.markdown()


def test_explicit_values_are_kept_and_strategies_counted():
    plan = plan_training({"person": 36, "reg": 5000}, _concepts(0.01), TrainingSettings(batch_size=4, epochs=10))
    assert [c.balancing for c in plan.concepts] == [1.0, 0.01]
    assert plan.concepts[1].samples_per_epoch == 50
    assert plan.steps_per_epoch == (36 + 50) // 4  # leftovers that do not fill a batch are dropped
    samples = plan_training({"person": 36, "reg": 5000}, _concepts(12.0, balancing_strategy="SAMPLES"), TrainingSettings())
    assert samples.concepts[1].samples_per_epoch == 12


def test_validation_and_disabled_concepts_add_no_steps():
    concepts = _concepts(validation=True) + [Concept(name="off", path="o", enabled=False, caption=CaptionSource(source="text", text="x"))]
    plan = plan_training({"person": 10, "reg": 50, "off": 9}, concepts, TrainingSettings(epochs=1))
    assert [c.name for c in plan.concepts] == ["person", "reg"]
    assert plan.steps_per_epoch == 10


def test_measured_speed_wins_over_the_configured_one(tmp_path):
    ws = Workspace(tmp_path)
    assert read_measured_speed(ws) is None
    ws.measured_speed.parent.mkdir(parents=True)
    ws.measured_speed.write_text(json.dumps({"iterations_per_second": 2.0}))
    plan = plan_training({"person": 36, "reg": 5000}, _concepts(), TrainingSettings(), read_measured_speed(ws))
    assert plan.speed_source == "measured" and plan.estimated_seconds == pytest.approx(7_200)
