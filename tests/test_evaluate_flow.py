"""The evaluate and select flows on Prefect: a new checkpoint generates and scores only its column, a
re-run is all Cached, and the chosen checkpoint is copied out, reported, and loads in diffusers."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from .test_evaluate import write_checkpoints
from typer.testing import CliRunner

from likeness.cli import app
from likeness.flows.evaluate import evaluate, select
from likeness.flows.prepare import prepare
from likeness.models import sampling
from likeness.profiles import write_profile
from likeness.settings import EvaluationSettings
from likeness.tasks.evaluate.grid import read_eval_table
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("prefect_flows", "one_torch_thread")
EVALUATION = {"prompts": ["photo of ohwx man", "ohwx man in a black suit"], "seeds_per_prompt": 2, "steps": 2,
              "class_prior_images": 1, "metrics": ["dino", "clip_i", "clip_t", "class_prior_loss"]}


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


@pytest.mark.slow
def test_evaluate_then_select_end_to_end(prepare_settings, tiny_model_dirs, monkeypatch):
    settings = prepare_settings()
    settings.evaluation = EvaluationSettings(**EVALUATION, dino_model=str(tiny_model_dirs.dino),
                                             clip_model=str(tiny_model_dirs.clip))
    ws = Workspace.from_settings(settings)
    prepare(settings)
    epoch_2, epoch_4 = write_checkpoints(tiny_model_dirs.sdxl, ws.checkpoints, (2, 4))
    epoch_4.rename(epoch_4.with_suffix(".later"))  # saved "later" in training

    first = evaluate(settings)
    assert (first["grid"].processed, first["scores"].processed) == (8, 6)  # 2 columns x 2 prompts x 2 seeds; 2 x 3 metrics
    generated = []
    original = sampling.generate  # imported by the grid when it generates
    monkeypatch.setattr(sampling, "generate", lambda pipe, prompts, *a, **k: generated.extend(prompts) or
                        original(pipe, prompts, *a, **k))
    epoch_4.with_suffix(".later").rename(epoch_4)
    second = evaluate(settings)
    assert not second["grid"].cached and (second["grid"].processed, second["grid"].reused) == (4, 8)
    assert len(generated) == 4 and (second["scores"].processed, second["scores"].reused) == (3, 6)
    profile = write_profile(settings, ws.root.parent / "profile.toml")
    third = CliRunner().invoke(app, ["evaluate", "--profile", str(profile)])  # the command, all Cached
    assert third.exit_code == 0, third.output
    assert "grid: cached" in third.output and "scores: cached" in third.output and len(generated) == 4
    assert "overview.jpg" in third.output and "scores.csv" in third.output

    rows = read_eval_table(second["scores"], ws)["rows"]
    assert [r["label"] for r in rows] == ["base", "epoch 2", "epoch 4"]
    for row in rows:
        assert -1 <= row["dino"] <= 1 and -1 <= row["clip_i"] <= 1 and -1 <= row["clip_t"] <= 1
        assert row["class_prior_loss"] > 0 and row["validation_loss"] is None
        assert row["likeness"] == pytest.approx((row["dino"] + row["clip_i"]) / 2)

    chosen = select(settings)
    extra = read_eval_table(chosen, ws)["extra"]
    copied = Path(extra["copied"])
    assert copied.parent == settings.output_destination and copied.name in ("demo-2.safetensors", "demo-4.safetensors")
    assert copied.read_bytes() == (ws.checkpoints / copied.name).read_bytes()
    report = Path(extra["report"]).read_text()
    assert extra["reason"] in report and "| base | - |" in report and Path(extra["plot"]).is_file()
    pipe = StableDiffusionXLPipeline.from_single_file(str(copied), config=str(tiny_model_dirs.sdxl), local_files_only=True)
    assert torch.isfinite(pipe.unet.conv_in.weight).all()
    assert select(settings).cached
    for key in ("grid", "scores", "selection"):
        assert latest_artifact(key) is not None, key
    assert "data:image/jpeg;base64," in latest_artifact("grid").data


def test_select_before_evaluate_names_the_command(prepare_settings, tmp_path):
    profile = write_profile(prepare_settings(), tmp_path / "profile.toml")
    result = CliRunner().invoke(app, ["select", "--profile", str(profile)])
    assert result.exit_code == 2
    assert "likeness evaluate --profile" in result.output and str(profile) in result.output
