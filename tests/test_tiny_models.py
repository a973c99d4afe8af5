"""Tiny models: built from configs, saved, loaded back through the real loaders, and usable."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; this file must never touch the network

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut
from transformers import CLIPTokenizer

from likeness.models.loading import is_local_path, load_clipseg, load_sdxl_pipeline
from likeness.models.tiny import (
    MARKER,
    TE1_WIDTH,
    TE2_PROJECTION,
    TE2_WIDTH,
    build_clip_tokenizer,
    build_tiny_clipseg,
    build_tiny_sdxl,
    save_tiny_models,
)

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
PROMPT = "photo of ohwx man, in a black suit"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny") / "models", seed=0)


@pytest.fixture(scope="module")
def built():
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def loaded(saved):
    return load_sdxl_pipeline(saved.sdxl)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_save_load_round_trip_is_bit_identical(built, loaded):
    for name in MODULES:
        assert_same_weights(getattr(built, name), getattr(loaded, name))


def test_loaded_unet_forward(loaded):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, TE1_WIDTH + TE2_WIDTH)
    added = {"text_embeds": torch.randn(1, TE2_PROJECTION), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        out = loaded.unet(latents, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()


def test_loaded_text_encoders_forward(loaded):
    options = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, ids_2 = loaded.tokenizer(PROMPT, **options).input_ids, loaded.tokenizer_2(PROMPT, **options).input_ids
    with torch.no_grad():
        out_1 = loaded.text_encoder(ids, output_hidden_states=True)
        out_2 = loaded.text_encoder_2(ids_2, output_hidden_states=True)
    assert out_1.hidden_states[-2].shape == (1, 77, TE1_WIDTH)
    assert out_2.hidden_states[-2].shape == (1, 77, TE2_WIDTH)
    assert out_2.text_embeds.shape == (1, TE2_PROJECTION)
    assert loaded.tokenizer_2.pad_token == "!"  # like SDXL's OpenCLIP tokenizer


def test_same_seed_same_weights_other_seed_different(built):
    again, other = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=1)
    for name in MODULES:
        assert_same_weights(getattr(built, name), getattr(again, name))
        first = next(iter(getattr(built, name).state_dict().items()))
        assert not torch.equal(first[1], getattr(other, name).state_dict()[first[0]]), name


def test_tokenizer_round_trip(tmp_path: Path):
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    ids = reloaded(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == reloaded.bos_token_id
    assert reloaded.convert_ids_to_tokens(ids[1:5]) == ["photo</w>", "of</w>", "ohwx</w>", "man</w>"]
    assert build_clip_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_tokenizer_encodes_any_text_without_unknowns():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("Zürich 東京 😀 Ω", add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "zürich 東京 😀 ω"


def test_clipseg_save_load_same_logits(saved):
    model, processor = build_tiny_clipseg(seed=0)
    loaded_model, loaded_processor = load_clipseg(saved.clipseg)
    image = Image.fromarray(astronaut()).resize((64, 64))
    inputs = processor(text=["head"], images=[image], return_tensors="pt")
    loaded_inputs = loaded_processor(text=["head"], images=[image], return_tensors="pt")
    assert torch.equal(inputs.input_ids, loaded_inputs.input_ids)
    # Built with the PIL backend; loading picks torchvision where installed (resizes differ a little).
    assert torch.allclose(inputs.pixel_values, loaded_inputs.pixel_values, atol=0.1)
    with torch.no_grad():
        logits, again = model(**loaded_inputs).logits, loaded_model(**loaded_inputs).logits
    assert logits.shape == (1, 352, 352)  # (B, 352, 352): only the channel axis is squeezed
    # equal weights, separately allocated: kernels may differ in the last digits (AVX-512 vs AVX2)
    torch.testing.assert_close(again, logits, rtol=1e-3, atol=1e-3)  # measured: up to 2e-4 apart
    assert_same_weights(model, loaded_model)


def test_missing_path_names_it(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_sdxl_pipeline(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_sdxl_pipeline(str(missing) + ".safetensors")


def test_folder_without_model_index_names_it(tmp_path: Path):
    with pytest.raises(ValueError, match=f"{tmp_path}: not a diffusers folder"):
        load_sdxl_pipeline(tmp_path)


def test_non_sdxl_checkpoint_names_it(tmp_path: Path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, checkpoint)
    with pytest.raises(ValueError, match=f"{checkpoint}: not an SDXL checkpoint"):
        load_sdxl_pipeline(checkpoint)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match=f"{text_file}: not a .safetensors"):
        load_sdxl_pipeline(text_file)


def test_local_path_or_hub_id(tmp_path: Path):
    assert not is_local_path("stabilityai/stable-diffusion-xl-base-1.0")
    assert not is_local_path("CIDAS/clipseg-rd64-refined")
    assert is_local_path("workspace/demo/models/sdxl")  # two slashes: not a repo id
    assert is_local_path("./sdxl") and is_local_path("~/models/x") and is_local_path("model.safetensors")
    assert is_local_path(str(tmp_path)) and is_local_path(tmp_path)


def test_generation_fits_together(loaded):
    out = loaded("photo of ohwx man", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_saving_again_reuses_complete_folders(saved):
    marker = saved.sdxl / MARKER
    before = marker.stat().st_mtime_ns
    assert save_tiny_models(saved.sdxl.parent, seed=0) == saved
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["seed"] == 0
    assert not [p for p in saved.sdxl.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_incomplete_or_other_seed_folder_is_rebuilt(tmp_path: Path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "junk").write_text("half-written")
    built = save_tiny_models(tmp_path, seed=3)
    assert not (built.sdxl / "junk").exists()
    assert json.loads((built.sdxl / MARKER).read_text())["seed"] == 3
    assert json.loads((built.clipseg / MARKER).read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "clipseg", "dino", "sdxl"]
