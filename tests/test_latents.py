"""Latent cache: VAE mode unscaled, masks at 1/8, frozen text-encoder outputs, keys made of content."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from likeness.latent_index import load_latents, load_text_outputs, read_latents_index
from likeness.manifest import manifest_stage
from likeness.models.conditioning import encode_text
from likeness.models.tiny import build_tiny_sdxl
from likeness.tasks import latents as latents_module
from likeness.tasks.balance import balance_stage
from likeness.tasks.captions import captions_stage
from likeness.tasks.latents import downscale_masks, encode_images, latents_stage
from likeness.tasks.masks import masks_stage
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl(seed=0)


def test_latents_are_the_unscaled_mode(pipe):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = encode_images(pipe.vae, images)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, mean)  # the mode of a Gaussian is its mean; no scaling factor applied


def test_masks_are_downscaled_by_8_with_antialiasing():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1.0
    small = downscale_masks(mask)
    assert small.shape == (1, 1, 8, 8)
    assert torch.allclose(small[..., :, :3], torch.ones(1)) and torch.allclose(small[..., :, 5:], torch.zeros(1))
    line = torch.zeros(1, 1, 64, 64)
    line[..., :, 19] = 1.0  # one pixel column: antialiasing keeps its mass, plain sampling would drop or inflate it
    assert downscale_masks(line).sum().item() == pytest.approx(line.sum().item() / 64, rel=0.05)


def _manifest(settings):
    ws = Workspace.from_settings(settings)
    index = ws.hashes()
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    report.raise_for_errors()
    resize = resize_stage(scan, settings.resize, ws, index)
    masks = masks_stage(resize, settings.masks, settings.concepts, ws, index, device="cpu")
    captions = captions_stage(resize, settings.concepts, settings.captioner, settings.run.seed, ws, index)
    balance, _ = balance_stage(resize, settings.concepts, settings.training, ws, index,
                               class_prior_images=settings.evaluation.class_prior_images)
    return ws, manifest_stage(resize, masks, captions, balance, settings.concepts, ws, index)


def test_stage_caches_by_content(prepare_settings, pipe, monkeypatch):
    settings = prepare_settings()
    ws, manifest = _manifest(settings)
    result = latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    assert (result.processed, result.reused) == (7, 0)
    index = read_latents_index(ws.latents_index)
    assert len(index) == 7 and set(index["caption"]) == {"ohwx man", "man"}
    assert index.groupby("caption")["text_path"].nunique().tolist() == [1, 1]  # one file per distinct caption
    person = load_file(index[index["id"] == "person/p0"]["latent_path"].item())
    reg = load_file(index[index["id"] == "reg/r0"]["latent_path"].item())
    assert person["latent"].shape == (4, 8, 8) and person["mask"].shape == (1, 8, 8) and "mask" not in reg
    text = load_file(index["text_path"][0])
    assert set(text) == {"text_encoder_2_hidden", "text_encoder_2_pooled"}  # TE1 is trained: not cached
    live = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, [index["caption"][0]])  # the same tiny weights
    torch.testing.assert_close(text["text_encoder_2_hidden"], live.hidden[0])  # (77, 48), penultimate layer
    torch.testing.assert_close(text["text_encoder_2_pooled"], live.pooled[0])  # (32,), projected
    latents, masks = load_latents(index["latent_path"][:3].tolist() + index["latent_path"][-1:].tolist())
    assert latents.shape == (4, 4, 8, 8) and masks.shape == (4, 1, 8, 8) and (masks[-1] == 1).all()
    cached = load_text_outputs(index["text_path"][:2].tolist())
    assert list(cached) == ["text_encoder_2"] and cached["text_encoder_2"].hidden.shape == (2, 77, 48)

    monkeypatch.setattr(latents_module, "load_encoders", lambda *a, **k: pytest.fail("a model was loaded"))
    again = latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    assert (again.processed, again.reused) == (0, 7)
    monkeypatch.undo()

    both_frozen = settings.model_copy(update={"training": settings.training.model_copy(
        update={"text_encoder": settings.training.text_encoder.model_copy(update={"train": False, "weight_dtype": "float32"})})})
    latents_stage(manifest, both_frozen, ws, ws.hashes(), device="cpu")
    text = load_file(read_latents_index(ws.latents_index)["text_path"][0])
    assert set(text) == {"text_encoder_hidden", "text_encoder_2_hidden", "text_encoder_2_pooled"}


def test_new_vae_weights_redo_the_latents_but_not_the_text(prepare_settings, tiny_model_dirs, tmp_path):
    model = shutil.copytree(tiny_model_dirs.sdxl, tmp_path / "sdxl")
    settings = prepare_settings(model={"base_model": str(model)})
    ws, manifest = _manifest(settings)
    latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    redone = latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    extra = json.loads(redone.table.read_text())["extra"]
    assert (redone.processed, redone.reused) == (7, 0) and (extra["text_processed"], extra["text_reused"]) == (0, 2)
