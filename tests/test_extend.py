"""Extending a finished run: raising training.epochs continues from the last backup, and with the
CONSTANT schedule ends bit for bit where a straight run of that length ends (issue 18)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from likeness.settings import Settings
from likeness.trainer import loop
from likeness.trainer.extend import continues_into, describe_continuation, run_length
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = {"sampling": {"unit": "NEVER", "at_start": False}, "backups": {"every": 1, "unit": "EPOCH"}}


def _progress(settings, epoch, step, batch=0, total=24):
    return {"epoch": epoch, "step": step, "batch": batch, "length": run_length(settings), "total_steps": total}


def test_a_longer_run_continues_a_shorter_ones_backup_a_shorter_run_only_one_before_its_end():
    two = Settings.model_validate({"training": {"epochs": 2}})
    four = Settings.model_validate({"training": {"epochs": 4}})
    assert continues_into(_progress(two, 2, 12), four)  # extend: 2 -> 4
    assert continues_into(_progress(four, 2, 12), two)  # shorten, from a backup at its new end
    assert not continues_into(_progress(four, 3, 18), two)  # trained past the new end
    assert not continues_into({"epoch": 1, "step": 6}, four)  # a backup of before issue 18: no length recorded


def test_a_parts_stop_may_change_only_where_the_backup_had_not_reached_it():
    def stop(n, unit="EPOCH", epochs=4):
        return Settings.model_validate({"training": {"epochs": epochs, "text_encoder": {
            "stop_training_after": n, "stop_training_after_unit": unit}}})

    at_end_of_2 = _progress(stop(3, epochs=2), 2, 12)
    assert continues_into(at_end_of_2, stop(5))  # both stops still ahead: the steps done are the same
    assert continues_into(_progress(stop(1, epochs=2), 2, 12), stop(1))
    assert not continues_into(_progress(stop(1, epochs=2), 2, 12), stop(2))  # epoch 1 trained without it
    assert not continues_into(at_end_of_2, stop(1))  # the text encoder trained in epoch 1 before
    mid_epoch = _progress(stop(2, epochs=2), 1, 9, batch=3)  # inside epoch 1: counts 0 and 1 seen
    assert not continues_into(mid_epoch, stop(1)) and continues_into(mid_epoch, stop(7))
    steps = _progress(stop(10, "STEP", epochs=2), 2, 12)
    assert continues_into(steps, stop(10, "STEP")) and not continues_into(steps, stop(11, "STEP"))


def test_the_length_is_not_in_the_fingerprint_and_sd15_ignores_text_encoder_2():
    base = {"training": {"epochs": 2, "text_encoder": {"stop_training_after": 3, "stop_training_after_unit": "EPOCH"}}}
    two, four = Settings.model_validate(base), Settings.model_validate({"training": {**base["training"], "epochs": 4}})
    assert loop.training_relevant(two) == loop.training_relevant(four)
    assert loop.training_relevant(two) != loop.training_relevant(Settings.model_validate({"training": {"epochs": 2}}))
    sd15 = {"model": {"model_type": "sd15"}}
    plain = Settings.model_validate(sd15)
    other_te2 = Settings.model_validate({**sd15, "training": {"text_encoder_2": {"clip_skip": 3, "learning_rate": 1e-3}}})
    assert loop.training_relevant(plain) == loop.training_relevant(other_te2)
    sdxl_te2 = Settings.model_validate({"training": {"text_encoder_2": {"clip_skip": 3}}})
    assert loop.training_relevant(Settings()) != loop.training_relevant(sdxl_te2)


def test_a_schedule_over_the_total_step_count_says_it_is_stretched():
    def settings(epochs, scheduler):
        return Settings.model_validate({"training": {"epochs": epochs}, "schedule": {"scheduler": scheduler}})

    lines = describe_continuation(_progress(settings(2, "COSINE"), 2, 12, total=12), settings(4, "COSINE"), 24)
    assert lines[0].startswith("extending from epoch 2 to 4")
    assert "COSINE" in lines[1] and "stretched from 12 to 24 steps" in lines[1]
    assert len(describe_continuation(_progress(settings(2, "CONSTANT"), 2, 12, total=12), settings(4, "CONSTANT"), 24)) == 1


@pytest.mark.slow
def test_raising_epochs_continues_the_finished_run_bit_for_bit(train_settings):
    four = train_settings(training={"epochs": 4}, **QUIET)
    ws = Workspace.from_settings(four)
    straight = loop.train(four, log=lambda m: None)
    expected = load_file(straight.final_checkpoint)
    expected_losses = (ws.reports / "loss.csv").read_text()
    for folder in (ws.checkpoints, ws.backups, ws.reports):
        shutil.rmtree(folder)

    two = four.model_copy(update={"training": four.training.model_copy(update={"epochs": 2})})
    first = loop.train(two, log=lambda m: None)
    assert first.resumed_from is None and [c.epoch for c in first.checkpoints] == [1, 2]
    earlier = {c.path: c.path.read_bytes() for c in first.checkpoints}

    logged = []
    extended = loop.train(four, log=logged.append)
    assert extended.resumed_from is not None and extended.resumed_from.name == f"backup-{first.steps:09d}"
    assert any(line.startswith("extending from epoch 2 to 4") for line in logged), logged
    assert extended.steps == straight.steps == 2 * first.steps
    weights = load_file(extended.final_checkpoint)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert (ws.reports / "loss.csv").read_text() == expected_losses  # every step's loss, the same
    assert [c.epoch for c in extended.checkpoints] == [1, 2, 3, 4]  # the earlier ones still listed ...
    assert all(path.read_bytes() == data for path, data in earlier.items())  # ... and kept as they were
    assert loop.train(four, log=lambda m: None).resumed_from.name == f"backup-{extended.steps:09d}"  # nothing to do
