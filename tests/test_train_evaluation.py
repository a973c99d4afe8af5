"""Evaluation during training: the base model's scores first, then after every epoch (or save),
logged to the loss table, the sinks and reports/evaluation.csv, kept in backups; early stop on
face identity without improvement, or on prompt fidelity below the base model's tolerance."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

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
    sink, lines = Recording(), []
    result = train(settings, log=lines.append, sinks=[sink])
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
    # each evaluation's images go to the evaluate stage for the weights that made them: the base model and
    # test-1, test-2 (saved at the evaluated steps, just before the evaluations)
    shared = [line for line in lines if "the evaluate stage reuses them" in line]
    assert [line.split(" recorded")[0] for line in shared] == [
        "2 evaluation image(s) of the base model", "2 evaluation image(s) of step 6", "2 evaluation image(s) of step 12"]
    records = [json.loads(p.read_text()) for p in (ws.root / "evaluation" / "records" / "images").glob("*.json")]
    assert len(records) == 6 and all(r["source"] == "in-training evaluation" for r in records)


@pytest.fixture
def grid_generations(monkeypatch):
    """The images the grid stage generates, as (checkpoint file name or 'base', seed)."""
    from likeness.models import sampling  # evaluation images are generated through it at call time
    from likeness.tasks.evaluate import grid as grid_module

    made, generate, load = [], sampling.generate, grid_module.load_candidate
    loading = []

    def counting_load(candidate, *args):
        loading.append(candidate.name)
        return load(candidate, *args)

    def counting_generate(pipe, prompts, negatives, seeds, **kwargs):
        if loading:  # the grid loaded a column (the training's own evaluation generates through here too)
            made.extend((loading[-1], seed) for seed in seeds)
        return generate(pipe, prompts, negatives, seeds, **kwargs)

    monkeypatch.setattr(grid_module, "load_candidate", counting_load)
    monkeypatch.setattr(sampling, "generate", counting_generate)
    return made


def test_the_evaluate_stage_reuses_the_in_training_evaluations_images(train_settings, tiny_model_dirs, grid_generations):
    from likeness.tasks.evaluate.grid import find_checkpoints, grid_stage, read_eval_table, reuse_line

    # saves after epochs 1 and 2; evaluates epoch 2 alone (the last: before its save), 1 seed of the grid's 2:
    # the grid reuses seed 0 of test-2 and generates its seed 1, all of base and test-1 (not evaluated)
    settings = train_settings(sampling={"unit": "NEVER"}, backups={"unit": "NEVER", "keep_final": False},
                              evaluation={"prompts": ["photo of ohwx man"], "steps": 2, "seeds_per_prompt": 2,
                                          "metrics": ["clip_t"], "clip_model": str(tiny_model_dirs.clip),
                                          "during_training": {"enabled": True, "every": 2, "at_start": False, "seeds": 1,
                                                              "prompt_fidelity": False}})
    logged = []
    result = train(settings, log=logged.append)
    assert [row["epoch"] for row in result.evaluations] == [2]
    assert "1 evaluation image(s) of step 12 recorded for test-2.safetensors: the evaluate stage reuses them" in logged
    ws = Workspace.from_settings(settings)
    checkpoints = [str(p) for p in find_checkpoints(ws)]
    assert [p.rsplit("/", 1)[-1] for p in checkpoints] == ["test-1.safetensors", "test-2.safetensors"]

    grid = grid_stage(checkpoints, settings, ws, ws.hashes())
    assert sorted(grid_generations) == [("base", 0), ("base", 1), ("test-1.safetensors", 0), ("test-1.safetensors", 1),
                                        ("test-2.safetensors", 1)]
    table = read_eval_table(grid, ws)
    assert (grid.processed, grid.reused, table["extra"]["from_training"]) == (5, 1, 1)
    assert reuse_line(grid, 1) == "evaluate: 1 images reused from the in-training evaluation, 0 from earlier runs, 5 generated"

    # a fresh generation of every image: the same images to float rounding (the checkpoint holds the evaluated
    # weights to the bit, but MKL's products depend on the weights' memory alignment: a few pixels 1/255 apart)
    reused = {(r["checkpoint"], r["seed"]): pixels(r["image"]) for r in table["rows"]}
    for folder in ("images", "records"):
        shutil.rmtree(ws.root / "evaluation" / folder)
    grid_generations.clear()
    fresh = read_eval_table(grid_stage(checkpoints, settings, ws, ws.hashes()), ws)
    assert len(grid_generations) == 6 and fresh["extra"]["from_training"] == 0
    regenerated = {(r["checkpoint"], r["seed"]): pixels(r["image"]) for r in fresh["rows"]}
    assert regenerated.keys() == reused.keys()
    for cell, image in reused.items():
        difference = np.abs(image - regenerated[cell])
        assert difference.max() <= 2 and difference.mean() < 0.05, (cell, difference.max(), difference.mean())
    other_seed = np.abs(reused["test-2.safetensors", 0] - reused["test-2.safetensors", 1]).mean()
    assert regenerated["test-2.safetensors", 0].any()
    assert other_seed > 10  # the tolerance is far below what another image differs by


def pixels(path: str):
    return np.asarray(Image.open(path), dtype=np.float32)


@pytest.mark.parametrize(("training", "device", "why"), [
    ({}, "cpu", None),  # all float32 (the demo, the tests)
    ({"method": "lora"}, "cpu", "LoRA: the grid merges the adapters"),
    ({"train_dtype": "bfloat16"}, "cpu", "the grid generates in float32 on cpu, the evaluation under autocast(bfloat16)"),
    ({"unet": {"weight_dtype": "bfloat16"}}, "cpu", "training.unet.weight_dtype bfloat16: the grid computes that part in float32"),
    ({"train_dtype": "bfloat16", "output_dtype": "bfloat16", "unet": {"weight_dtype": "bfloat16"}}, "cuda", None),  # the GPU profile
    ({"train_dtype": "bfloat16", "output_dtype": "float16", "unet": {"weight_dtype": "bfloat16"}}, "cuda",
     "training.output_dtype float16 rounds training.vae.weight_dtype float32"),
])
def test_images_are_shared_only_where_the_grid_computes_them_alike(training, device, why):
    import torch

    from likeness.trainer.evaluation import grid_mismatch

    float32 = {"train_dtype": "float32", "output_dtype": "float32", **{part: {"weight_dtype": "float32"}
               for part in ("unet", "text_encoder", "text_encoder_2")}}
    settings = Settings.model_validate({"model": {"model_type": "sdxl"}, "training": float32 | training})
    found = grid_mismatch(settings, torch.device(device))
    assert found == why if why is None else found.startswith(why)
