"""LoRA files (issue 16): extraction by SVD, the kohya/ComfyUI key layout, diffusers' own loader,
peft-trained adapters saved in the same layout, and the OneTrainer import of LoRA settings."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from likeness.models.checkpoint import CheckpointInfo, TE1_PREFIX, UNET_PREFIX, save_single_file
from likeness.models.lora import apply_lora, is_lora_file
from likeness.models.lora_extract import extract_lora, low_rank

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny layers: threads only spin on a shared machine

# ComfyUI (comfy/lora.py, model_lora_keys_clip): the text-encoder modules a LoRA may patch, per layer.
COMFY_CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                      "self_attn.out_proj")


def comfy_key_map(checkpoint_keys, te1_layers):
    """LoRA name -> the checkpoint weight it patches, by ComfyUI's rules for an SDXL single file:
    UNet `lora_unet_<key without diffusion_model. and .weight, dots as _>`; text encoder 1
    `lora_te1_text_model_encoder_layers_<b>_<module, dots as _>`."""
    mapping = {}
    for key in checkpoint_keys:
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            mapping["lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")] = key
    for b in range(te1_layers):
        for module in COMFY_CLIP_MODULES:
            key = f"{TE1_PREFIX}text_model.encoder.layers.{b}.{module}.weight"
            if key in checkpoint_keys:
                mapping[f"lora_te1_text_model_encoder_layers_{b}_{module.replace('.', '_')}"] = key
    return mapping


def assert_comfy_loads_every_key(lora_path, checkpoint_path, te1_layers):
    """Every key is one ComfyUI's loader consumes (<name>.lora_up.weight / .lora_down.weight / .alpha of
    a mapped name), and up @ down has the shape of the weight it patches."""
    lora = load_file(str(lora_path))
    with safe_open(str(checkpoint_path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mapping = comfy_key_map(set(shapes), te1_layers)
    names = {key.split(".", 1)[0] for key in lora}
    assert names <= set(mapping), sorted(names - set(mapping))[:5]
    used = {f"{n}.{suffix}" for n in names for suffix in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert used == set(lora)  # no unused key
    for name in names:
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        target = shapes[mapping[name]]
        assert up.shape[0] == target[0] and down.shape[1:] == target[1:] and up.shape[1] == down.shape[0]
    return names


@pytest.fixture(scope="module")
def base_pipeline(tiny_model_dirs):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs.sdxl)


@pytest.fixture(scope="module")
def tuned_pair(tiny_model_dirs, base_pipeline, tmp_path_factory):
    """The tiny base (diffusers folder) and a 'fine-tuned' single file: every linear and conv weight of
    the UNet and text encoder 1 moved by seeded noise; text encoder 2 and the VAE untouched."""
    base = tiny_model_dirs.sdxl
    tuned = copy.deepcopy(base_pipeline)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (tuned.unet, tuned.text_encoder):
            for child in module.modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    child.weight.add_(torch.randn(child.weight.shape, generator=g) * 0.01)
    path = tmp_path_factory.mktemp("lora") / "person-3.safetensors"
    save_single_file(tuned, path, CheckpointInfo(str(base), 3, 30), "float32")
    return base, path, tuned




def _relative_error(merged, tuned, base):
    num = sum(float((merged[k] - tuned[k]).square().sum()) for k in tuned)
    den = sum(float((base[k] - tuned[k]).square().sum()) for k in tuned)
    return (num / den) ** 0.5


def test_low_rank_matches_the_svd_optimum_and_kohya_shapes():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=g)  # (out, in, kh, kw)
    factors = low_rank(conv, 4)
    assert factors.down.shape == (4, 3, 3, 3) and factors.up.shape == (8, 4, 1, 1)
    s = torch.linalg.svdvals(conv.reshape(8, -1))
    assert factors.residual_sq == pytest.approx(float(s[4:].square().sum()), rel=1e-4)  # Eckart-Young
    tall = torch.randn(12, 5, generator=g)  # (out, in) with out > in: the other side's Gram matrix
    full = low_rank(tall, 99)
    assert full.down.shape == (5, 5) and torch.allclose(full.up @ full.down, tall, atol=1e-5)


def test_randomized_low_rank_is_seeded_and_near_the_optimum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(512, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    diff = (u * (1e-2 / torch.arange(1, 257))) @ v.T  # (512, 256), a power-law spectrum
    exact = low_rank(diff, 8, "exact")
    auto = low_rank(diff, 8)  # 8 + 8 directions, a quarter of 256 at most: the randomized way
    assert torch.equal(auto.up, low_rank(diff, 8, "randomized").up)  # that way, and the same file every time
    assert auto.down.shape == (8, 256) and auto.up.shape == (512, 8)
    assert exact.residual_sq <= auto.residual_sq <= exact.residual_sq * 1.01 ** 2  # error within 1 % of optimal
    with pytest.raises(ValueError, match="unknown method"):
        low_rank(diff, 8, "svd")


def test_extracted_lora_loads_in_diffusers_and_approaches_the_checkpoint(tuned_pair, base_pipeline, tmp_path):
    base, checkpoint, tuned = tuned_pair
    base_pipe = base_pipeline
    errors = []
    for rank in (2, 8, 4096):  # 4096: more than any layer's dimension, i.e. full rank
        out = tmp_path / f"r{rank}.safetensors"
        report = extract_lora(checkpoint, base, out, rank=rank, dtype="float32")
        pipe = apply_lora(copy.deepcopy(base_pipe), out)
        for part, key in (("unet", "unet"), ("text_encoder", "te1")):
            merged, want, before = (getattr(p, part).state_dict() for p in (pipe, tuned, base_pipe))
            measured = _relative_error(merged, want, before)
            assert measured == pytest.approx(report.parts[key].relative_error, abs=1e-3)
            errors.append((rank, part, measured))
        for part in ("text_encoder_2", "vae"):  # parts the LoRA does not touch stay the base's
            assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, part).state_dict().values(),
                                                         getattr(base_pipe, part).state_dict().values()))
    for part in ("unet", "text_encoder"):
        by_rank = [e for r, p, e in errors if p == part]
        assert by_rank[0] > by_rank[1] > by_rank[2] and by_rank[2] < 1e-5, (part, by_rank)
    merged, want = pipe.unet.state_dict(), tuned.unet.state_dict()
    assert max(float((merged[k] - want[k]).abs().max()) for k in want) < 1e-5  # full rank: equal


def test_extracted_keys_are_the_ones_comfyui_maps(tuned_pair, tmp_path):
    base, checkpoint, tuned = tuned_pair
    out = tmp_path / "person-lora.safetensors"
    report = extract_lora(checkpoint, base, out, rank=4, dtype="bfloat16")
    names = assert_comfy_loads_every_key(out, checkpoint, tuned.text_encoder.config.num_hidden_layers)
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in tuned.unet.modules())
    assert sum(n.startswith("lora_unet_") for n in names) == layers == report.parts["unet"].layers
    assert sum(n.startswith("lora_te1_") for n in names) == 6 * tuned.text_encoder.config.num_hidden_layers
    assert "lora_unet_input_blocks_0_0" in names and "lora_unet_time_embed_0" in names  # conv_in, time MLP
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("lora_unet_input_blocks_0_0.lora_down.weight").dtype == torch.bfloat16
    assert meta["ss_network_dim"] == "4" and meta["likeness.rank"] == "4" and meta["likeness.epoch"] == "3"
    assert meta["likeness.source_checkpoint"] == str(checkpoint) and len(meta["likeness.source_sha256"]) == 64
    assert meta["likeness.base_model_sha256"].startswith("folder:")
    assert is_lora_file(out) and not is_lora_file(checkpoint)


def test_an_unchanged_text_encoder_is_left_out(tiny_model_dirs, base_pipeline, tmp_path):
    tuned = copy.deepcopy(base_pipeline)
    with torch.no_grad():
        tuned.unet.conv_in.weight.add_(0.05)
    path = tmp_path / "unet-only.safetensors"
    save_single_file(tuned, path, CheckpointInfo("base", 1, 1), "float32")
    report = extract_lora(path, tiny_model_dirs.sdxl, tmp_path / "l.safetensors", rank=2, dtype="float32")
    keys = load_file(str(tmp_path / "l.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"lora_unet_input_blocks_0_0"}
    assert "text encoder 1: unchanged from the base model, left out" in report.summary()


def test_bad_inputs_are_clear_errors(tuned_pair, tiny_sd15_dir, tmp_path):
    from typer.testing import CliRunner

    from likeness.cli import app

    base, checkpoint, _ = tuned_pair
    with pytest.raises(ValueError, match="at least 1"):
        extract_lora(checkpoint, base, tmp_path / "x.safetensors", rank=0)
    with pytest.raises(ValueError, match="not the base model of that checkpoint"):
        extract_lora(checkpoint, tiny_sd15_dir, tmp_path / "x.safetensors", rank=2)
    result = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "missing.safetensors"), "--base", str(base),
                                      "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "missing.safetensors" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_layer_presets_choose_onetrainers_layers(base_pipeline):
    from likeness.models.lora_train import layer_filters, lora_target_modules

    unet = base_pipeline.unet
    attn_only = lora_target_modules(unet, layer_filters("attn-only", None))
    attn_mlp = lora_target_modules(unet, layer_filters("attn-mlp", None))
    full = lora_target_modules(unet, layer_filters("full", None))
    assert attn_only and all(".attn1." in n or ".attn2." in n for n in attn_only)
    assert set(attn_only) < set(attn_mlp) < set(full)
    assert all(".attentions." in n for n in attn_mlp) and any(n.endswith(".ff.net.2") for n in attn_mlp)
    assert "conv_in" in full and "time_embedding.linear_1" in full
    assert lora_target_modules(unet, layer_filters("full", ["proj_in"])) == [n for n in full if "proj_in" in n]


def test_peft_adapters_save_in_the_same_layout(base_pipeline, tmp_path):
    from likeness.models.lora_train import add_lora_adapters, adapter_weights, save_lora_checkpoint
    from likeness.settings import LoraSettings

    pipe = copy.deepcopy(base_pipeline)
    counts = add_lora_adapters(pipe, ["unet", "text_encoder"], LoraSettings(rank=4, alpha=2.0, layer_preset="full"))
    assert counts["text_encoder"] == 6 * pipe.text_encoder.config.num_hidden_layers
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(adapter_weights(pipe.unet)) == 2 * counts["unet"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if ".lora_B." in name:  # peft starts B at zero: give the adapters something to carry
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = save_lora_checkpoint(pipe, ["unet", "text_encoder"], tmp_path / "person-2.safetensors",
                                CheckpointInfo("base", 2, 8), rank=4, alpha=2.0, dtype="float32")
    checkpoint = tmp_path / "base.safetensors"
    save_single_file(base_pipeline, checkpoint, CheckpointInfo("base", 0, 0), "float32")
    names = assert_comfy_loads_every_key(path, checkpoint, pipe.text_encoder.config.num_hidden_layers)
    assert len(names) == counts["unet"] + counts["text_encoder"]
    merged = apply_lora(copy.deepcopy(base_pipeline), path)
    torch.manual_seed(0)
    unet_config = pipe.unet.config
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, unet_config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim),
             "time_ids": torch.randn(1, 6)}
    ids = torch.randint(0, 100, (1, 77))
    with torch.no_grad():
        want = pipe.unet(sample, 10, hidden, added_cond_kwargs=added).sample
        got = merged.unet(sample, 10, hidden, added_cond_kwargs=added).sample
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(merged.text_encoder(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state,
                              atol=1e-5)


def test_lora_settings_are_checked():
    from likeness.settings import Settings

    with pytest.raises(ValueError, match="text_encoder_2.train = false"):
        Settings.model_validate({"training": {"method": "lora", "text_encoder_2": {"train": True}}})
    with pytest.raises(ValueError, match="saving.format"):
        Settings.model_validate({"training": {"method": "lora"}, "saving": {"format": "diffusers"}})
    with pytest.raises(ValueError, match="layer_preset"):
        Settings.model_validate({"training": {"method": "lora", "lora": {"layer_preset": "most"}}})


def test_onetrainer_lora_config_maps_one_to_one(tmp_path):
    from likeness.onetrainer import import_onetrainer

    config = json.loads((Path(__file__).parent / "data" / "onetrainer-sdxl-person.json").read_text())
    config |= {"training_method": "LORA", "lora_rank": 32, "lora_alpha": 16.0, "dropout_probability": 0.1,
               "lora_weight_dtype": "BFLOAT_16", "lora_layer_preset": "attn-only", "lora_layers": "attn",
               "lora_decompose": True}
    config["text_encoder_2"]["train"] = True
    (tmp_path / "ot.json").write_text(json.dumps(config))
    result = import_onetrainer(tmp_path / "ot.json")
    t = result.settings.training
    assert t.method == "lora" and t.text_encoder_2.train is False and t.caption_dropout_probability == 0
    assert (t.lora.rank, t.lora.alpha, t.lora.dropout, t.lora.weight_dtype, t.lora.layer_preset, t.lora.layers) == \
        (32, 16.0, 0.1, "bfloat16", "attn-only", None)
    assert any("DoRA" in w for w in result.warnings) and any("text_encoder_2" in w for w in result.warnings)
    config |= {"lora_layer_preset": None, "lora_layers": "attn1, ff"}
    (tmp_path / "ot.json").write_text(json.dumps(config))
    assert import_onetrainer(tmp_path / "ot.json").settings.training.lora.layers == ["attn1", "ff"]
