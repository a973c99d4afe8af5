"""Evaluation during training: the base model's scores first, then after every epoch (or save),
logged to the loss table, the sinks and reports/evaluation.csv, kept in backups; early stop on
face identity without improvement, or on prompt fidelity below the base model's tolerance."""

import csv

import pytest

from likeness.settings import Settings
from likeness.trainer.backup import latest_backup
from likeness.trainer.evaluation import InTrainingEvaluator, scalars
from likeness.trainer.loop import train, training_fingerprint
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recording:
    def __init__(self):
        self.scalars_seen = []

    def scalars(self, step, values):
        self.scalars_seen.append((step, values))

    def image(self, step, tag, image):
        pass

    def close(self):
        pass


def evaluator(history, **during) -> InTrainingEvaluator:
    settings = Settings.model_validate({"evaluation": {"during_training": {"enabled": True, **during}}})
    return InTrainingEvaluator(settings, Workspace.from_settings(settings), device=None, history=history)


def rows(*identities, clip_t=0.30):
    base = {"step": 0, "epoch": 0, "face_identity": 0.05, "clip_t": 0.30}
    return [base, *({"step": i * 10, "epoch": i, "face_identity": v, "clip_t": clip_t} for i, v in enumerate(identities, 1))]


def test_early_stop_waits_patience_evaluations_without_an_improvement_of_min_delta():
    on = {"early_stop": True, "patience": 2, "min_delta": 0.01}
    assert evaluator(rows(0.3, 0.5, 0.505), **on).stop_reason() is None  # 0.505 is no improvement, but only one
    reason = evaluator(rows(0.3, 0.5, 0.505, 0.49), **on).stop_reason()
    assert reason.startswith("face identity has not improved by 0.01 for 2 evaluations") and "epoch 2" in reason
    assert evaluator(rows(0.3, 0.5, 0.505, 0.49), **(on | {"early_stop": False})).stop_reason() is None
    assert "no face" not in (evaluator(rows(None, None), **on).stop_reason() or "")  # never a face: not improving
    assert evaluator(rows(None, None), **on).stop_reason().startswith("face identity has not improved")


def test_early_stop_when_prompt_fidelity_falls_below_the_base_models_tolerance():
    stop = evaluator(rows(0.3, 0.6, clip_t=0.27), early_stop=True, patience=5).stop_reason()
    assert stop.startswith("prompt fidelity 0.2700 fell below the base model's 0.3000 - 0.02")
    assert evaluator(rows(0.3, 0.6, clip_t=0.28), early_stop=True, patience=5).stop_reason() is None


def test_due_every_n_epochs_or_at_each_save_and_never_twice():
    assert [e for e in range(1, 7) if evaluator([], every=2).due(e, saved=False)] == [2, 4, 6]
    assert evaluator([], every=0).due(3, saved=True) and not evaluator([], every=0).due(3, saved=False)
    assert not evaluator(rows(0.3), every=1).due(1, saved=True)  # resumed after that evaluation
    assert scalars({"step": 5, "epoch": 1, "face_identity": None, "clip_t": 0.3}) == {"eval/clip_t": 0.3}


def test_training_evaluates_logs_and_stops_early(train_settings, tiny_model_dirs):
    settings = train_settings(training={"epochs": 3}, sampling={"unit": "NEVER"},
                              evaluation={"prompts": ["photo of ohwx man"], "steps": 2, "clip_model": str(tiny_model_dirs.clip),
                                          "during_training": {"enabled": True, "every": 1, "seeds": 2,
                                                              "early_stop": True, "patience": 2}})
    sink = Recording()
    result = train(settings, log=print, sinks=[sink])
    # the tiny random model draws no face: identity never improves, so it stops after 2 evaluations
    assert result.stopped_early.startswith("face identity has not improved")
    assert result.epochs == 2 and result.final_checkpoint.name == "test-2.safetensors"
    assert [row["epoch"] for row in result.evaluations] == [0, 1, 2]
    assert all(row["face_no_face"] == 1.0 and -1 <= row["clip_t"] <= 1 for row in result.evaluations)
    evaluated = [values for _, values in sink.scalars_seen if "eval/clip_t" in values]
    assert len(evaluated) == 3 and "eval/face_no_face" in evaluated[0]
    ws = Workspace.from_settings(settings)
    with open(ws.report("evaluation.csv"), newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    with open(result.loss_table, newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("eval_clip_t")]
    assert len(logged) == 2  # after epochs 1 and 2 (the base model's evaluation comes before any step)
    backup = latest_backup(ws.backups, training_fingerprint(settings, ws))
    assert [row["epoch"] for row in backup.objects()["evaluations"]] == [0, 1, 2]  # the kept final state (backups.keep_final)
    assert len(list((ws.samples / "evaluation").glob("*.jpg"))) == 6
