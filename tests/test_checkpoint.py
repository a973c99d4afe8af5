"""Single-file SDXL export: our file loads back through diffusers' own single-file loader bit-exact."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from likeness.models import checkpoint as ckpt
from likeness.models.checkpoint import (
    CheckpointInfo,
    checkpoint_filename,
    load_checkpoint_metadata,
    save_checkpoint,
    save_single_file,
    unet_to_original,
)
from likeness.models.loading import load_sdxl_pipeline
from likeness.models.tiny import build_tiny_sdxl

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
INFO = CheckpointInfo(base_model="tiny/sdxl", epoch=15, step=1080, settings_hash="abc123")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny pipeline, its diffusers folder (the config for loading) and our fp32 export."""
    root = tmp_path_factory.mktemp("ckpt")
    pipe = build_tiny_sdxl(seed=3)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "sdxl")
    path = save_single_file(pipe, root / "tiny-15.safetensors", INFO, dtype="float32")
    return pipe, root / "sdxl", path


def load_back(path: Path, folder: Path, **kwargs) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_weights(expected, actual, cast: torch.dtype | None = None) -> None:
    for part in PARTS:
        want, got = getattr(expected, part).state_dict(), getattr(actual, part).state_dict()
        assert set(want) == set(got), f"{part}: key sets differ"
        for key, tensor in want.items():
            assert not got[key].is_meta, f"{part}.{key} left on the meta device"
            tensor = tensor if cast is None else tensor.to(cast)
            assert got[key].dtype == tensor.dtype, f"{part}.{key}"
            assert torch.equal(got[key], tensor), f"{part}.{key} differs"


def generate(pipe, seed: int = 7) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("photo of ohwx man", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="np").images


def test_file_has_the_a1111_layout(source):
    _, _, path = source
    keys = set(load_file(str(path)))
    for prefix in (ckpt.UNET_PREFIX, ckpt.VAE_PREFIX, ckpt.TE1_PREFIX + "text_model.", ckpt.TE2_PREFIX):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys  # decoder levels reversed
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(".q_proj." in k or "layer_norm1" in k for k in keys if k.startswith(ckpt.TE2_PREFIX))


def test_round_trip_through_diffusers_from_single_file_is_bit_exact(source):
    pipe, folder, path = source
    assert_same_weights(pipe, load_back(path, folder))


def test_text_projection_is_stored_transposed_and_loads_back(source):
    pipe, folder, path = source
    weight = pipe.text_encoder_2.text_projection.weight  # (P, W) = (32, 48): not square, so orientation shows
    assert weight.shape[0] != weight.shape[1]
    with safe_open(str(path), framework="pt") as f:
        stored = f.get_tensor(ckpt.TE2_PREFIX + "text_projection")
    assert torch.equal(stored, weight.T)
    loaded = load_back(path, folder).text_encoder_2.text_projection.weight
    assert not loaded.is_meta and torch.equal(loaded, weight)


def test_round_trip_generates_the_same_image(source):
    pipe, folder, path = source
    # bit-identical weights (above); outputs of separately loaded models may differ in the last digits
    np.testing.assert_allclose(generate(load_back(path, folder)), generate(pipe), rtol=0, atol=1e-4)


def test_bf16_export_matches_the_bf16_cast_source(source, tmp_path):
    pipe, folder, _ = source
    path = save_single_file(pipe, tmp_path / "bf16.safetensors", INFO, dtype="bfloat16")
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.bfloat16}
    assert_same_weights(pipe, load_back(path, folder, dtype=torch.bfloat16), cast=torch.bfloat16)
    assert load_checkpoint_metadata(path).dtype == "bfloat16"


def test_the_project_loader_reads_our_file(source):
    pipe, folder, path = source
    assert_same_weights(pipe, load_sdxl_pipeline(path, config=folder))


def test_metadata_round_trip(source):
    _, _, path = source
    info = load_checkpoint_metadata(path)
    assert (info.base_model, info.epoch, info.step, info.settings_hash) == ("tiny/sdxl", 15, 1080, "abc123")
    assert info.architecture == "stable-diffusion-xl-v1-base"
    assert info.dtype == "float32" and info.version


def test_metadata_of_foreign_or_broken_files_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_checkpoint_metadata(broken)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="no likeness metadata"):
        load_checkpoint_metadata(foreign)


def test_a_write_killed_midway_leaves_no_file_under_the_final_name(source, tmp_path, monkeypatch):
    pipe, _, _ = source
    target = tmp_path / "person-30.safetensors"

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(ckpt, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_single_file(pipe, target, INFO)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_overwrite_keeps_the_previous_checkpoint(source, tmp_path, monkeypatch):
    pipe, _, _ = source
    target = save_single_file(pipe, tmp_path / "person-30.safetensors", INFO, dtype="float32")
    before = target.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_single_file(pipe, target, INFO)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_diffusers_folder_output(source, tmp_path):
    pipe, _, _ = source
    folder = tmp_path / checkpoint_filename("person", 45, "diffusers")
    save_checkpoint(pipe, folder, INFO, dtype="bfloat16", fmt="diffusers")
    save_checkpoint(pipe, folder, INFO, dtype="bfloat16", fmt="diffusers")  # overwriting works
    for part in PARTS:  # the files themselves are in the output dtype, not cast by the loader
        files = list((folder / part).glob("*.safetensors"))
        assert files and all({t.dtype for t in load_file(str(f)).values()} == {torch.bfloat16} for f in files)
    assert_same_weights(pipe, load_sdxl_pipeline(folder, torch_dtype=torch.bfloat16), cast=torch.bfloat16)
    assert load_checkpoint_metadata(folder).epoch == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["person-45"]


def test_bad_requests_name_the_problem(source, tmp_path):
    pipe, _, _ = source
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_single_file(pipe, tmp_path / "x.ckpt", INFO)
    with pytest.raises(ValueError, match="saving.format"):
        save_checkpoint(pipe, tmp_path / "x", INFO, fmt="zip")
    with pytest.raises(ValueError, match="output_dtype"):
        save_single_file(pipe, tmp_path / "x.safetensors", INFO, dtype="float8")
    state = dict(pipe.unet.state_dict(), **{"lora_extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lora_extra.weight"):
        unet_to_original(state, pipe.unet.config)


def test_checkpoint_filename():
    assert checkpoint_filename("person", 15) == "person-15.safetensors"
    assert checkpoint_filename("person", 15, "diffusers") == "person-15"


# --- the real SDXL shapes, on the meta device (no memory, no download) ----------------------

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)


def same_layout(converted: dict, state: dict) -> None:
    assert set(converted) == set(state)
    assert all(converted[k].shape == state[k].shape for k in state)


def test_real_sdxl_unet_and_vae_keys_invert_diffusers_converter():
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)
    original = unet_to_original(unet.state_dict(), unet.config)
    assert "model.diffusion_model.input_blocks.6.0.op.weight" in original  # level 1's downsampler
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in original  # upsampler after attention
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in original
    same_layout(sfu.convert_ldm_unet_checkpoint(original, unet.config), unet.state_dict())
    original = ckpt.vae_to_original(vae.state_dict(), vae.config)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    same_layout(sfu.convert_ldm_vae_checkpoint(original, vae.config), vae.state_dict())


def test_real_sdxl_text_encoder_keys_invert_diffusers_converter():
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    original = ckpt.clip_l_to_original(te1.state_dict()) | ckpt.open_clip_to_original(te2.state_dict())
    assert sfu.infer_diffusers_model_type(original) == "xl_base"  # what diffusers detects without config=
    back_1 = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(original).items()}
    same_layout(back_1, {k.removeprefix("text_model."): v for k, v in te1.state_dict().items()})
    same_layout(sfu.convert_open_clip_checkpoint(te2, original, prefix=ckpt.TE2_PREFIX), te2.state_dict())
