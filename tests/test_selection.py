"""Checkpoint selection on constructed score tables: every rule, each guard exactly at its tolerance,
ties to the earlier checkpoint, the fallback, and the report, plot and atomic copy."""


import pytest
from PIL import Image

from likeness.content import HashIndex
from likeness.settings import SelectionSettings
from likeness.stages import Counts
from likeness.tasks.evaluate.grid import eval_table, read_eval_table, write_eval_table
from likeness.tasks.evaluate.select import PICKS_FILE, SelectionError, choose, guard_failures, likeness, scores_table, select_stage
from likeness.workspace import Workspace

BASE = {"checkpoint": "base", "epoch": None, "step": 0, "base": True, "dino": 0.30, "clip_i": 0.50, "clip_t": 0.30,
        "class_prior_loss": 0.20, "validation_loss": 0.40}


def row(epoch: int, **metrics) -> dict:
    values = {"dino": 0.5, "clip_i": 0.5, "clip_t": 0.30, "class_prior_loss": 0.20, "validation_loss": 0.40, **metrics}
    values["likeness"] = likeness(values)
    return {"checkpoint": f"person-{epoch}.safetensors", "epoch": epoch, "step": epoch * 10, "base": False, **values}


def rows(*checkpoints: dict) -> list[dict]:
    return [{**BASE, "likeness": likeness(BASE)}, *checkpoints]


def test_likeness_is_the_mean_of_the_enabled_measured_metrics():
    assert likeness({"dino": 0.2, "clip_i": 0.6}) == pytest.approx(0.4)
    assert likeness({"dino": 0.2, "clip_i": 0.6}, enabled=["clip_i", "clip_t"]) == pytest.approx(0.6)
    assert likeness({"dino": None, "clip_i": 0.6}) == pytest.approx(0.6)
    assert likeness({"dino": 0.2, "clip_i": 0.6}, enabled=["clip_t"]) is None


def test_default_rule_picks_the_highest_likeness_that_passes_both_guards():
    table = rows(row(15, dino=0.6), row(30, dino=0.9, clip_t=0.20), row(45, dino=0.8, class_prior_loss=0.5), row(60, dino=0.7))
    choice = choose(table, SelectionSettings())
    assert choice.row["epoch"] == 60  # 30 forgot the prompts, 45 the class
    assert choice.failures["person-30.safetensors"][0].startswith("prompt fidelity")
    assert choice.failures["person-45.safetensors"][0].startswith("class-prior loss")
    assert not choice.warnings
    assert "person-60.safetensors (epoch 60) has the highest likeness" in choice.reason
    assert "2 of 4 checkpoints" in choice.reason


@pytest.mark.parametrize(("clip_t", "passes"), [(0.28, True), (0.2799, False), (0.35, True)])
def test_prompt_fidelity_guard_is_inclusive_at_the_tolerance(clip_t, passes):
    failures = guard_failures(row(10, clip_t=clip_t), BASE, SelectionSettings(fidelity_tolerance=0.02))
    assert (failures == []) is passes


@pytest.mark.parametrize(("loss", "passes"), [(0.22, True), (0.2201, False), (0.1, True)])
def test_class_prior_guard_is_relative_and_inclusive_at_the_tolerance(loss, passes):
    failures = guard_failures(row(10, class_prior_loss=loss), BASE, SelectionSettings(class_prior_tolerance=0.10))
    assert (failures == []) is passes


def test_unmeasured_guards_pass():
    assert guard_failures(row(10, clip_t=None, class_prior_loss=None), BASE, SelectionSettings()) == []
    assert guard_failures(row(10, clip_t=0.0), {**BASE, "clip_t": None}, SelectionSettings()) == []
    assert guard_failures(row(10, clip_t=0.0), None, SelectionSettings()) == []


def test_a_tie_goes_to_the_earlier_checkpoint_whatever_the_table_order():
    table = rows(row(45, dino=0.8), row(15, dino=0.8), row(30, dino=0.7))
    assert choose(table, SelectionSettings()).row["epoch"] == 15


def test_no_checkpoint_passing_falls_back_to_the_best_with_a_warning():
    table = rows(row(15, dino=0.6, clip_t=0.1), row(30, dino=0.9, class_prior_loss=0.9))
    choice = choose(table, SelectionSettings())
    assert choice.row["epoch"] == 30
    assert len(choice.warnings) == 1 and "no checkpoint passed the guards" in choice.warnings[0]
    assert "none of which kept prompt fidelity" in choice.reason


def test_validation_loss_rule_picks_the_lowest_passing_loss():
    table = rows(row(15, validation_loss=0.5), row(30, validation_loss=0.3, clip_t=0.1), row(45, validation_loss=0.35))
    assert choose(table, SelectionSettings(rule="validation_loss")).row["epoch"] == 45


def test_weighted_rule_subtracts_losses():
    table = rows(row(15, dino=0.6, clip_i=0.6, class_prior_loss=0.10), row(30, dino=0.7, clip_i=0.7, class_prior_loss=0.22))
    by_likeness = SelectionSettings(rule="weighted", weights={"dino": 1.0, "clip_i": 1.0})
    assert choose(table, by_likeness).row["epoch"] == 30
    heavy_loss = SelectionSettings(rule="weighted", weights={"dino": 1.0, "clip_i": 1.0, "class_prior_loss": 10.0})
    assert choose(table, heavy_loss).row["epoch"] == 15  # 1.2 - 1.0 > 1.4 - 2.2


def test_epoch_rule_ignores_the_guards_and_names_the_epochs_when_missing():
    table = rows(row(15), row(30, clip_t=0.0))
    assert choose(table, SelectionSettings(rule="epoch", epoch=30)).row["epoch"] == 30
    with pytest.raises(SelectionError, match=r"epoch = 20.*epochs: 15, 30"):
        choose(table, SelectionSettings(rule="epoch", epoch=20))
    with pytest.raises(ValueError, match="needs 'epoch'"):
        SelectionSettings(rule="epoch")


def test_a_rule_whose_metric_was_not_measured_is_a_clear_error():
    with pytest.raises(SelectionError, match="validation_loss, which was not measured.*validation = true"):
        choose(rows(row(15, validation_loss=None)), SelectionSettings(rule="validation_loss"))
    with pytest.raises(SelectionError, match="only the base model"):
        choose(rows(), SelectionSettings())


def test_select_stage_copies_the_choice_and_writes_report_and_plot(tmp_path):
    ws = Workspace(tmp_path / "ws")
    files = {}
    for epoch in (15, 30):
        files[epoch] = ws.checkpoints / f"person-{epoch}.safetensors"
        files[epoch].parent.mkdir(parents=True, exist_ok=True)
        files[epoch].write_bytes(f"weights of epoch {epoch}".encode())
    table = [dict(r, path=str(files.get(r["epoch"], "base"))) for r in rows(row(15, dino=0.6), row(30, dino=0.7))]
    write_eval_table(ws, "scores", table, Counts(), {}, {})
    result = select_stage(scores_table(ws), SelectionSettings(), tmp_path / "out", ws, HashIndex())

    extra = read_eval_table(result, ws)["extra"]
    copied = tmp_path / "out" / "person-30.safetensors"
    assert extra["copied"] == str(copied) and copied.read_bytes() == b"weights of epoch 30"
    assert files[30].is_file()  # copied, not moved
    report = (ws.root / "evaluation" / "selection.md").read_text()
    assert "**Chosen:** `person-30.safetensors`" in report and extra["reason"] in report
    assert "| person-15.safetensors | 15 |" in report and "| base | - |" in report
    with Image.open(extra["plot"]) as plot:
        assert plot.format == "PNG" and plot.width >= 400
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [PICKS_FILE]  # no temporaries


def test_select_without_scores_names_likeness_evaluate(tmp_path):
    ws = Workspace(tmp_path)
    assert not eval_table(ws, "scores").exists()
    with pytest.raises(Exception, match="likeness evaluate"):
        scores_table(ws)


def test_a_new_pick_removes_the_earlier_picks_of_select_but_never_a_users_file(tmp_path):
    ws = Workspace(tmp_path / "ws")
    files = {}
    for epoch in (15, 30, 45):
        files[epoch] = ws.checkpoints / f"person-{epoch}.safetensors"
        files[epoch].parent.mkdir(parents=True, exist_ok=True)
        files[epoch].write_bytes(f"weights of epoch {epoch}".encode())
    table = [dict(r, path=str(files.get(r["epoch"], "base")))
             for r in rows(row(15, dino=0.6), row(30, dino=0.7), row(45, dino=0.65))]
    write_eval_table(ws, "scores", table, Counts(), {}, {})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"the user's own file")

    def pick(**rule):
        result = select_stage(scores_table(ws), SelectionSettings(**rule), out, ws, HashIndex())
        return read_eval_table(result, ws)["extra"]

    assert pick()["copied"] == str(out / "person-30.safetensors")
    second = pick(rule="epoch", epoch=15)
    assert second["removed"] == [str(out / "person-30.safetensors")]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mine.safetensors", "person-15.safetensors"]
    (out / "person-15.safetensors").write_bytes(b"edited by the user since")  # no longer what select wrote
    third = pick(rule="epoch", epoch=45)
    assert third["removed"] == [] and (out / "person-15.safetensors").read_bytes() == b"edited by the user since"
    assert (out / "mine.safetensors").read_bytes() == b"the user's own file"
    assert files[30].is_file() and files[15].is_file()  # the workspace's checkpoints stay
