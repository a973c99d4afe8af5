"""The default `likeness` rule with face identity: identity first, DINO / CLIP-I within the margin,
the guards still apply, a checkpoint whose images mostly show no face never wins, the base row
stays the reference; and the report and plot show the face columns."""

import pytest

from likeness.settings import SelectionSettings
from likeness.tasks.evaluate.select import choose, likeness, plot_scores, report_markdown

BASE = {"checkpoint": "base", "epoch": None, "step": 0, "base": True, "face_identity": 0.05, "face_no_face": 0.0,
        "face_identity_std": 0.02, "face_identity_min": 0.02, "face_identity_max": 0.08, "dino": 0.30, "clip_i": 0.50,
        "clip_t": 0.30, "class_prior_loss": 0.20, "validation_loss": 0.40}


def row(epoch: int, identity: float | None, no_face: float = 0.0, **metrics) -> dict:
    values = {"dino": 0.5, "clip_i": 0.5, "clip_t": 0.30, "class_prior_loss": 0.20, "validation_loss": 0.40, **metrics}
    spread = {} if identity is None else {"face_identity_std": 0.05, "face_identity_min": identity - 0.1,
                                          "face_identity_max": identity + 0.1}
    return {"checkpoint": f"person-{epoch}.safetensors", "epoch": epoch, "step": epoch * 10, "base": False,
            "face_identity": identity, "face_no_face": no_face, "face_identity_std": None, "face_identity_min": None,
            "face_identity_max": None, **spread, **values, "likeness": likeness(values)}


def table(*checkpoints: dict) -> list[dict]:
    return [{**BASE, "likeness": likeness(BASE)}, *checkpoints]


def test_face_identity_ranks_first_over_dino_and_clip_i():
    choice = choose(table(row(15, 0.40, dino=0.9), row(30, 0.62, dino=0.5), row(45, 0.55, dino=0.95)),
                    SelectionSettings())
    assert choice.row["epoch"] == 30
    assert "face identity" in choice.reason and not choice.warnings


def test_within_the_margin_dino_and_clip_i_decide():
    rows = table(row(15, 0.610, dino=0.5), row(30, 0.620, dino=0.6), row(45, 0.605, dino=0.9), row(60, 0.55, dino=0.99))
    assert choose(rows, SelectionSettings(identity_margin=0.02)).row["epoch"] == 45  # 60 is 0.07 below the best
    assert choose(rows, SelectionSettings(identity_margin=0.0)).row["epoch"] == 30  # identity alone


def test_the_guards_still_apply():
    rows = table(row(15, 0.50), row(30, 0.70, clip_t=0.20), row(45, 0.65, class_prior_loss=0.5))
    choice = choose(rows, SelectionSettings())
    assert choice.row["epoch"] == 15
    assert choice.failures["person-30.safetensors"][0].startswith("prompt fidelity")


def test_a_checkpoint_whose_images_mostly_show_no_face_cannot_win():
    rows = table(row(15, 0.40, no_face=0.25), row(30, 0.90, no_face=0.75), row(45, 0.45, no_face=0.5))
    choice = choose(rows, SelectionSettings())
    assert choice.row["epoch"] == 45  # 30's few faces look alike, but 3 of 4 images have none
    assert choice.failures["person-30.safetensors"] == ["no face in 75% of its images (> 50%)"]
    # not even when every checkpoint fails the other guards: the fallback keeps to those with faces
    rows = table(row(15, 0.40, clip_t=0.1), row(30, 0.90, no_face=1.0, clip_t=0.1))
    choice = choose(rows, SelectionSettings())
    assert choice.row["epoch"] == 15 and choice.warnings


def test_without_any_face_dino_and_clip_i_rank_with_a_warning():
    rows = table(row(15, None, no_face=1.0, dino=0.4), row(30, None, no_face=1.0, dino=0.7))
    choice = choose(rows, SelectionSettings())
    assert choice.row["epoch"] == 30
    assert any("face identity cannot decide" in w for w in choice.warnings)
    assert "no face identity" in choice.reason


def test_the_weighted_rule_counts_face_identity():
    rows = table(row(15, 0.30, dino=0.9), row(30, 0.80, dino=0.5))
    weights = {"face_identity": 1.0, "dino": 1.0, "clip_i": 0.0, "clip_t": 0.0, "class_prior_loss": 0.0,
               "validation_loss": 0.0}
    assert choose(rows, SelectionSettings(rule="weighted", weights=weights)).row["epoch"] == 30
    weights["face_identity"] = 0.0
    assert choose(rows, SelectionSettings(rule="weighted", weights=weights)).row["epoch"] == 15


def test_the_report_and_plot_show_face_identity(tmp_path):
    rows = table(row(15, 0.40, no_face=0.25), row(30, 0.62))
    choice = choose(rows, SelectionSettings())
    plot = plot_scores(rows, choice, SelectionSettings(), tmp_path / "selection.png")
    report = report_markdown(rows, choice, tmp_path / "out.safetensors", plot, [])
    header = next(line for line in report.splitlines() if line.startswith("| checkpoint"))
    assert "face_identity" in header and "no_face" in header and "identity_spread" in header
    base_line = next(line for line in report.splitlines() if line.startswith("| base"))
    assert "0.0500" in base_line and "base model" in base_line  # the base model's row: the reference
    assert "| 25% |" in report and "0.300..0.500" in report
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_the_face_guard_is_inclusive_at_max_no_face(share):
    rows = table(row(15, 0.40, no_face=share), row(30, 0.30))
    assert choose(rows, SelectionSettings(max_no_face=0.5)).row["epoch"] == 15
