"""Deterministic class-prior / validation loss: same inputs -> same value; the trained UNet and
TE1 change it, the frozen (cached) TE2 does not; rows come from the held-out ids and the cache."""

from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from likeness.holdout import heldout_ids
from likeness.models.conditioning import encode_text
from likeness.models.tiny import build_tiny_sdxl
from likeness.settings import Settings
from likeness.tasks.evaluate.class_prior import deterministic_loss, fixed_timesteps, loss_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = Settings.model_validate({"evaluation": {"loss_timesteps": 4}})


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def cache_rows(tmp_path_factory, pipe):
    """Two class images in a latent cache: random latents, TE2 outputs cached as the latent stage stores them."""
    folder = tmp_path_factory.mktemp("cache")
    out = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, ["man"])
    text = folder / "text.safetensors"
    save_file({"text_encoder_2_hidden": out.hidden[0].contiguous(), "text_encoder_2_pooled": out.pooled[0].contiguous()},
              str(text))
    rows = []
    for i in range(2):
        latent = folder / f"latent-{i}.safetensors"
        save_file({"latent": torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) * 5}, str(latent))
        rows.append({"id": f"reg/r{i}", "caption": "man", "latent_path": str(latent), "text_path": str(text),
                     "time_ids": [60, 80, 0, 0, 64, 64]})
    return rows


@contextmanager
def perturbed(pipe, part: str):
    """`pipe` with one part's weights nudged (as a training step would), restored after."""
    module = getattr(pipe, part)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    try:
        yield pipe
    finally:
        module.load_state_dict(saved)


def test_the_loss_is_deterministic_and_none_without_rows(pipe, cache_rows):
    first = deterministic_loss(pipe, cache_rows, SETTINGS)
    assert first is not None and first > 0
    assert deterministic_loss(pipe, cache_rows, SETTINGS) == first
    assert deterministic_loss(pipe, cache_rows[:1], SETTINGS) != first
    assert deterministic_loss(pipe, [], SETTINGS) is None


@pytest.mark.parametrize(("part", "changes"), [("unet", True), ("text_encoder", True), ("text_encoder_2", False)])
def test_trained_parts_change_the_loss_and_the_cached_frozen_encoder_does_not(pipe, cache_rows, part, changes):
    base = deterministic_loss(pipe, cache_rows, SETTINGS)
    with perturbed(pipe, part):
        value = deterministic_loss(pipe, cache_rows, SETTINGS)
    assert (value != pytest.approx(base, rel=1e-6)) is changes
    assert deterministic_loss(pipe, cache_rows, SETTINGS) == base  # restored


def test_fixed_timesteps_are_slice_centres_of_the_training_range():
    assert fixed_timesteps(4, SETTINGS, 1000).tolist() == [125, 375, 625, 875]
    narrow = Settings.model_validate({"training": {"noise": {"min_noising_strength": 0.5}}})
    assert fixed_timesteps(2, narrow, 1000).tolist() == [625, 875]


def manifest(n_reg: int = 6) -> pd.DataFrame:
    rows = [{"id": f"person/p{i}", "concept": "person", "role": "subject", "validation": False} for i in range(3)]
    rows += [{"id": f"reg/r{i}", "concept": "reg", "role": "regularization", "validation": False} for i in range(n_reg)]
    rows += [{"id": "check/v0", "concept": "check", "role": "subject", "validation": True}]
    return pd.DataFrame([{**r, "original_height": 60, "original_width": 80} for r in rows])


def latents_index(ids) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "variation": v, "caption": f"caption {v}", "latent_path": f"/c/{i}-{v}",
                          "text_path": "", "original_height": 64, "original_width": 64, "crop_top": 0,
                          "crop_left": 0, "target_height": 64, "target_width": 64} for i in ids for v in (0, 1)])


def test_loss_rows_are_the_held_out_or_validation_images_first_variation():
    df = manifest()
    index = latents_index(df["id"])
    held = loss_rows(df, index, "class_prior", 2)
    assert [r["id"] for r in held] == sorted(heldout_ids(df, 2)) and len(held) == 2
    assert all(r["id"].startswith("reg/") and r["caption"] == "caption 0" for r in held)
    assert held[0]["time_ids"] == [64, 64, 0, 0, 64, 64] and held[0]["text_path"] == ""  # as training conditioned it
    assert [r["id"] for r in loss_rows(df, index, "validation", 2)] == ["check/v0"]
    assert loss_rows(df, index, "class_prior", 0) == []


def test_missing_cached_latents_are_an_error_naming_prepare():
    df = manifest()
    with pytest.raises(ValueError, match="likeness prepare"):
        loss_rows(df, latents_index(["person/p0"]), "class_prior", 2)
