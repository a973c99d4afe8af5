"""The grid stage without Prefect: same seeds for every checkpoint, per-image records so a new
checkpoint generates only its column and a new prompt only its images, grids of the right size."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from likeness.models.checkpoint import CheckpointInfo, save_checkpoint
from likeness.models import sampling
from likeness.models.loading import load_sdxl_pipeline
from likeness.settings import Settings
from likeness.tasks.evaluate import grid as evaluate_module
from likeness.tasks.evaluate.grid import EvaluationError, find_checkpoints, grid_stage, read_eval_table
from likeness.tasks.evaluate.image_grid import grid_layout
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_checkpoints(base: Path, folder: Path, epochs: tuple[int, ...], seed: int = 0) -> list[Path]:
    """Checkpoints as training leaves them: UNet and TE1 drifting a little more every epoch."""
    pipe = load_sdxl_pipeline(base)
    generator, paths = torch.Generator().manual_seed(seed), []
    for epoch in epochs:
        with torch.no_grad():
            for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        info = CheckpointInfo(base_model=str(base), epoch=epoch, step=epoch * 5)
        paths.append(save_checkpoint(pipe, folder / f"demo-{epoch}.safetensors", info, dtype="float32"))
    return paths


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dirs, tmp_path_factory):
    return write_checkpoints(tiny_model_dirs.sdxl, tmp_path_factory.mktemp("save"), (2, 4))


def settings_for(tmp_path: Path, models, prompts=("photo of ohwx man",)) -> Settings:
    return Settings.model_validate({
        "run": {"workspace": str(tmp_path / "ws"), "device": "cpu"}, "model": {"base_model": str(models.sdxl)},
        "resize": {"resolution": 64}, "masks": {"model": str(models.clipseg)},
        "evaluation": {"prompts": list(prompts), "seeds_per_prompt": 2, "steps": 2, "metrics": ["clip_t"],
                       "dino_model": str(models.dino), "clip_model": str(models.clip)}})


@pytest.fixture
def counted(monkeypatch):
    """Count generated images and loaded columns."""
    calls = {"images": 0, "loads": []}
    generate, load = sampling.generate, evaluate_module.load_candidate  # the grid imports generate when it runs

    def counting_generate(pipe, prompts, *args, **kwargs):
        calls["images"] += len(prompts)
        return generate(pipe, prompts, *args, **kwargs)

    def counting_load(candidate, *args):
        calls["loads"].append(candidate.label)
        return load(candidate, *args)

    monkeypatch.setattr(sampling, "generate", counting_generate)
    monkeypatch.setattr(evaluate_module, "load_candidate", counting_load)
    return calls


def run(checkpoints, settings):
    ws = Workspace.from_settings(settings)
    result = grid_stage([str(p) for p in checkpoints], settings, ws, ws.hashes())
    return result, read_eval_table(result, ws)


def test_a_new_checkpoint_generates_its_column_alone_and_a_new_prompt_its_images(tmp_path, tiny_model_dirs,
                                                                                   checkpoints, counted):
    settings = settings_for(tmp_path, tiny_model_dirs)
    result, table = run(checkpoints[:1], settings)
    assert (counted["images"], result.processed) == (4, 4)  # base + 1 checkpoint, 1 prompt x 2 seeds
    assert [c["epoch"] for c in table["extra"]["candidates"]] == [None, 2]

    counted["images"], counted["loads"] = 0, []
    result, table = run(checkpoints, settings)
    assert (counted["images"], counted["loads"], result.reused) == (2, ["epoch 4"], 4)
    assert_same_seeds_and_grid_sizes(table, columns=3)

    counted["images"], counted["loads"] = 0, []
    result, _ = run(checkpoints, settings_for(tmp_path, tiny_model_dirs, ("photo of ohwx man", "ohwx man in a suit")))
    assert (counted["images"], result.processed, result.reused) == (6, 6, 6)  # 3 columns x 2 seeds of the new prompt

    counted["images"], counted["loads"] = 0, []
    result, _ = run(checkpoints, settings)
    assert (counted["images"], counted["loads"], result.processed) == (0, [], 0)  # nothing loaded at all


def assert_same_seeds_and_grid_sizes(table: dict, columns: int) -> None:
    cells = {(r["checkpoint"], r["seed"]): np.asarray(Image.open(r["image"]), dtype=np.float32) for r in table["rows"]}
    assert {seed for _, seed in cells} == {0, 1}
    # the same seed: near-identical images from slightly different weights; another seed: a different image
    drift = np.abs(cells["base", 0] - cells["demo-2.safetensors", 0]).mean()
    other_seed = np.abs(cells["base", 0] - cells["base", 1]).mean()
    assert 0 < drift < other_seed
    prompt_grid, overview = map(Path, table["extra"]["grids"])
    with Image.open(prompt_grid) as image:
        assert image.size == grid_layout(columns, 2, (64, 64), ["seed 0", "seed 1"], title="photo of ohwx man").size
    with Image.open(overview) as image:
        assert image.size == grid_layout(columns, 1, (64, 64), ["prompt 1"], title="x").size


def test_checkpoints_are_found_by_file_and_bad_ones_are_named(tmp_path, tiny_model_dirs, checkpoints):
    settings = settings_for(tmp_path, tiny_model_dirs)
    ws = Workspace.from_settings(settings)
    ws.checkpoints.mkdir(parents=True)
    for path in checkpoints[:2]:
        (ws.checkpoints / path.name).symlink_to(path)
    (ws.checkpoints / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in find_checkpoints(ws)] == ["demo-2.safetensors", "demo-4.safetensors"]
    stray = tmp_path / "other.safetensors"
    stray.write_bytes(b"junk")
    with pytest.raises(EvaluationError, match="other.safetensors"):
        run([stray], settings)
    with pytest.raises(EvaluationError, match="missing.safetensors: no such checkpoint"):
        run([tmp_path / "missing.safetensors"], settings)
    with pytest.raises(EvaluationError, match="must be unique"):
        run([checkpoints[0], ws.checkpoints / checkpoints[0].name], settings)


def test_the_losses_need_the_latent_cache(tmp_path, tiny_model_dirs, checkpoints):
    settings = settings_for(tmp_path, tiny_model_dirs)
    settings.evaluation.metrics = ["clip_t", "class_prior_loss"]
    with pytest.raises(EvaluationError, match="run `likeness prepare` first"):
        run(checkpoints[:1], settings)
