"""Training and evaluating a tiny SD 1.5 model end to end (CPU, fp32): prepare -> train 2 epochs ->
a single-file checkpoint diffusers loads, with the trained weights; the class-prior loss runs on it."""

import math

import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline

from likeness.latent_index import read_latents_index
from likeness.manifest import read_manifest
from likeness.models.loading import load_sd15_pipeline
from likeness.tasks.evaluate.class_prior import deterministic_loss, loss_rows
from likeness.tasks.evaluate.grid import Candidate, load_candidate
from likeness.trainer import loop
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAINED = ("unet", "text_encoder")


def weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {part: {k: v.detach().clone() for k, v in getattr(pipe, part).state_dict().items()} for part in TRAINED}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.fixture
def sd15_run(train_settings, tiny_sd15_dir, monkeypatch):
    """One 2-epoch run on the tiny SD 1.5 model, with the pipeline's weights at the final save."""
    settings = train_settings(
        model={"base_model": str(tiny_sd15_dir), "model_type": "sd15"},
        # text_encoder_2 = train is ignored for SD 1.5, which has no second encoder
        training={"text_encoder": {"train": True, "learning_rate": 1e-3}, "text_encoder_2": {"train": True},
                  "unet": {"learning_rate": 1e-3}},
        optimizer={"name": "ADAMW", "fused_back_pass": False},
        sampling={"at_start": False, "unit": "NEVER"}, backups={"unit": "NEVER"},
        evaluation={"class_prior_images": 2})
    saved, real_save = {}, loop.save_any_checkpoint

    def save(pipe, path, *args):
        saved[path.name] = weights(pipe)
        return real_save(pipe, path, *args)

    monkeypatch.setattr(loop, "save_any_checkpoint", save)
    settings.sampling.unit = "EPOCH"  # one sample at the end of each epoch
    lines: list[str] = []
    result = loop.train(settings, log=lines.append)
    return settings, result, saved, lines


def test_sd15_trains_saves_a_loadable_single_file_and_evaluates(sd15_run, tiny_sd15_dir):
    settings, result, saved, lines = sd15_run
    assert result.epochs == 2 and result.steps > 0
    assert any(line.startswith("training unet, text_encoder for 2 epochs") for line in lines), lines
    losses = pd.read_csv(result.loss_table)["loss"]
    assert len(losses) == result.steps and losses.map(math.isfinite).all()
    assert result.samples and all(p.is_file() and p.stat().st_size > 0 for p in result.samples)

    final = result.final_checkpoint
    assert final.is_file() and final.suffix == ".safetensors"
    loaded = StableDiffusionPipeline.from_single_file(str(final), config=str(tiny_sd15_dir), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    trained = saved[final.name]
    for part in TRAINED:
        assert_same(weights(loaded)[part], trained[part])
    base = weights(load_sd15_pipeline(tiny_sd15_dir))
    for part in TRAINED:
        assert any(not torch.equal(base[part][k], trained[part][k]) for k in trained[part]), f"{part} did not train"
    check_class_prior_loss(settings, result)


def check_class_prior_loss(settings, result) -> None:
    """The class-prior loss of the saved checkpoint, loaded as evaluation loads it: finite, deterministic."""
    ws = Workspace.from_settings(settings)
    rows = loss_rows(read_manifest(ws.manifest, ws), read_latents_index(ws.latents_index), "class_prior", 2)
    assert len(rows) == 2
    candidate = Candidate(result.final_checkpoint.name, str(result.final_checkpoint), 2, result.steps, "k")
    pipe = load_candidate(candidate, settings, torch.device("cpu"))
    assert isinstance(pipe, StableDiffusionPipeline)
    first, second = deterministic_loss(pipe, rows, settings), deterministic_loss(pipe, rows, settings)
    assert first is not None and math.isfinite(first) and first == second
    base_column = Candidate("base", str(settings.model.base_model), None, 0, "b")
    base = load_candidate(base_column, settings, torch.device("cpu"))
    assert isinstance(base, StableDiffusionPipeline)
    assert deterministic_loss(base, rows, settings) != first  # the trained weights change the loss
