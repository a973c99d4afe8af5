"""OneTrainer import: the reference config converts and loads; unsupported settings are listed."""

import copy
import json
from pathlib import Path

import pytest

from likeness.onetrainer import OneTrainerImportError, import_onetrainer
from likeness.profiles import load_profile, write_profile

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "onetrainer-sdxl-person.json"
FIXTURE = Path(__file__).parent / "data" / "onetrainer-sdxl-person.json"


@pytest.fixture
def reference() -> dict:
    # The shared reference when it is beside the repo, else the copy the tests carry.
    path = REFERENCE if REFERENCE.is_file() else FIXTURE
    return json.loads(path.read_text())


def write(tmp_path, config) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_fixture_is_the_shared_reference():
    if REFERENCE.is_file():
        assert json.loads(FIXTURE.read_text()) == json.loads(REFERENCE.read_text())


def test_reference_config_converts_one_to_one(tmp_path, reference):
    result = import_onetrainer(write(tmp_path, reference))
    s = result.settings
    assert result.warnings == []  # everything the reference run sets is supported
    assert s.model.base_model.endswith("RealVisXL_V4.0.safetensors")
    assert (s.training.epochs, s.training.batch_size, s.resize.resolution) == (400, 1, 1024)
    assert (s.training.unet.learning_rate, s.training.text_encoder.learning_rate) == (1e-5, 3e-6)
    assert s.training.unet.train and s.training.text_encoder.train and not s.training.text_encoder_2.train
    assert s.training.train_dtype == s.training.output_dtype == s.training.unet.weight_dtype == "bfloat16"
    assert s.training.vae.weight_dtype == "float32" and not s.training.vae.train
    af = s.optimizer.adafactor
    assert (s.optimizer.name, af.eps, af.eps2, af.clip_threshold, af.decay_rate, s.optimizer.weight_decay) == (
        "ADAFACTOR", 1e-30, 1e-3, 1.0, -0.8, 0.01)
    assert s.optimizer.fused_back_pass is False  # as the config says, even though our default is on
    mt = s.training.masked_training
    assert (mt.enabled, mt.unmasked_weight, mt.unmasked_probability) == (True, 0.6, 0.1)
    assert (s.saving.every, s.saving.unit, s.saving.prefix, s.saving.format) == (15, "EPOCH", "person", "safetensors")
    assert (s.sampling.every, s.sampling.unit, s.sampling.steps, s.sampling.cfg_scale) == (10, "MINUTE", 40, 7.0)
    assert s.sampling.sampler == "DPMPP_SDE_KARRAS" and len(s.sampling.prompts) == 2
    assert "kittens" in s.sampling.prompts[0].prompt and s.sampling.prompts[0].negative_prompt.startswith("blurry")
    assert s.backups.unit == "NEVER" and s.schedule.warmup_steps == 200
    person, reg = s.concepts
    assert (person.role, person.balancing, person.caption.source) == ("subject", 1.0, "text_file")
    assert person.caption.path == Path("/home/user/Documents/person_photos/caption.txt")
    assert (reg.role, reg.balancing, reg.masks) == ("regularization", 0.0022, False)


def test_imported_profile_loads_back(tmp_path, reference):
    result = import_onetrainer(write(tmp_path, reference))
    profile = write_profile(result.settings, tmp_path / "imported.toml", "imported\nfrom a test")
    assert load_profile(profile) == result.settings
    assert profile.read_text().startswith("# imported\n# from a test\n")


def test_unsupported_settings_are_listed(tmp_path, reference):
    config = copy.deepcopy(reference)
    config.update(tensorboard=True, loss_scaler="BATCH", foo_bar=3,
                  learning_rate_scheduler="REX", rolling_backup=False, backup_after_unit="MINUTE")
    config["concepts"][0]["image"]["enable_resolution_override"] = True
    config["optimizer"]["nesterov"] = True
    config["samples"][1]["cfg_scale"] = 5.0
    warnings = "\n".join(import_onetrainer(write(tmp_path, config)).warnings)
    for expected in ["tensorboard = true", 'loss_scaler = "BATCH"',
                     "foo_bar = 3: unknown OneTrainer setting", 'learning_rate_scheduler = "REX"',
                     "rolling_backup = false", "concepts[0].image.enable_resolution_override = true",
                     "optimizer.nesterov = true",
                     "samples[*].cfg_scale: differs"]:
        assert expected in warnings


def test_adamw_maps_its_own_fields(tmp_path, reference):
    config = copy.deepcopy(reference)
    config["optimizer"] = {"optimizer": "ADAMW", "beta1": 0.8, "beta2": 0.99, "eps": 1e-7, "weight_decay": 0.1}
    s = import_onetrainer(write(tmp_path, config)).settings
    assert (s.optimizer.name, s.optimizer.adamw.beta1, s.optimizer.adamw.beta2, s.optimizer.weight_decay) == (
        "ADAMW", 0.8, 0.99, 0.1)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model_type": "STABLE_DIFFUSION_20"}, "model_type 'STABLE_DIFFUSION_20' is not supported"),
        ({"training_method": "EMBEDDING"}, "training_method 'EMBEDDING' is not supported"),
        ({"__version": 3}, "__version 3 is not supported"),
        ({"concepts": []}, "no concepts"),
        ({"epochs": 0}, "training.epochs: must be >= 1"),
    ],
)
def test_unsupported_configs_are_clear_errors(tmp_path, reference, change, expected):
    with pytest.raises(OneTrainerImportError, match=expected):
        import_onetrainer(write(tmp_path, reference | change))


def test_not_json_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(OneTrainerImportError, match="config.json: not valid JSON"):
        import_onetrainer(bad)


# --- SD 1.5 configs, aspect bucketing, image augmentations, tag shuffling (issue 7) ------------


def test_stable_diffusion_15_config_imports_as_sd15(tmp_path, reference):
    config = copy.deepcopy(reference) | {"model_type": "STABLE_DIFFUSION_15", "resolution": "512", "ema": "GPU",
                                         "base_model_name": "/models/realisticVision.safetensors"}
    config["text_encoder_2"] = {**config["text_encoder_2"], "train": True, "weight_dtype": "FLOAT_8"}
    result = import_onetrainer(write(tmp_path, config))
    s = result.settings
    assert result.warnings == []  # TE2's section (even an unknown dtype) means nothing for SD 1.5
    assert (s.model.model_type, s.resize.resolution, s.training.ema.enabled) == ("sd15", 512, True)
    assert s.training.text_encoder.train and not s.training.text_encoder_2.train
    sdxl = import_onetrainer(write(tmp_path, reference)).settings
    assert sdxl.model.model_type == "sdxl"


def test_aspect_ratio_bucketing_maps_to_bucket_mode(tmp_path, reference):
    assert import_onetrainer(write(tmp_path, reference)).settings.resize.mode == "pad"
    result = import_onetrainer(write(tmp_path, reference | {"aspect_ratio_bucketing": True}))
    assert result.settings.resize.mode == "bucket" and result.warnings == []


def test_image_augmentations_map_to_the_concept(tmp_path, reference):
    config = copy.deepcopy(reference)
    config["concepts"][0]["image"].update(
        enable_crop_jitter=True, enable_random_flip=True, enable_fixed_rotate=True, random_rotate_max_angle=12.0,
        enable_random_brightness=True, random_brightness_max_strength=0.2, enable_random_contrast=True,
        random_contrast_max_strength=0.3, enable_fixed_saturation=True, enable_random_saturation=True,
        random_saturation_max_strength=0.1, enable_random_hue=True, random_hue_max_strength=0.05,
        enable_random_mask_rotate_crop=True, enable_random_circular_mask_shrink=True)
    result = import_onetrainer(write(tmp_path, config))
    assert result.warnings == []
    aug = result.settings.concepts[0].augmentations
    assert aug.crop_jitter and aug.mask_rotate_crop and aug.circular_mask_shrink
    assert (aug.flip, aug.rotate, aug.rotate_max_angle) == ("random", "fixed", 12.0)
    assert (aug.brightness, aug.brightness_max_strength, aug.contrast, aug.contrast_max_strength) == (
        "random", 0.2, "random", 0.3)
    assert (aug.saturation, aug.saturation_max_strength) == ("fixed", 0.1)  # fixed wins over random
    assert (aug.hue, aug.hue_max_strength) == ("random", 0.05)
    untouched = result.settings.concepts[1].augmentations
    assert untouched.flip == "off" and not untouched.crop_jitter


def test_an_out_of_range_strength_is_a_clear_error(tmp_path, reference):
    config = copy.deepcopy(reference)
    config["concepts"][0]["image"].update(enable_random_hue=True, random_hue_max_strength=0.9)
    with pytest.raises(OneTrainerImportError, match="hue_max_strength"):
        import_onetrainer(write(tmp_path, config))


def test_tag_shuffling_maps_to_the_caption_source(tmp_path, reference):
    config = copy.deepcopy(reference)
    config["concepts"][0]["text"].update(enable_tag_shuffling=True, tag_delimiter=";", keep_tags_count=2)
    result = import_onetrainer(write(tmp_path, config))
    caption = result.settings.concepts[0].caption
    assert result.warnings == []
    assert (caption.shuffle_tags, caption.tag_delimiter, caption.keep_tags) == (True, ";", 2)
    assert not result.settings.concepts[1].caption.shuffle_tags


def test_stochastic_rounding_off_with_bf16_weights_is_a_caution(tmp_path, reference):
    result = import_onetrainer(write(tmp_path, reference))  # the guide's run: bf16 weights, rounding off
    assert not result.settings.optimizer.stochastic_rounding  # imported as it was...
    (caution,) = result.cautions  # ...but said once, with the setting that fixes it
    assert "bfloat16 weights (unet, text_encoder)" in caution and "optimizer.stochastic_rounding=true" in caution
    config = copy.deepcopy(reference)
    config["optimizer"]["stochastic_rounding"] = True
    assert import_onetrainer(write(tmp_path, config)).cautions == []
    config["optimizer"]["stochastic_rounding"] = False
    for part in ("unet", "text_encoder"):
        config[part]["weight_dtype"] = "FLOAT_32"
    assert import_onetrainer(write(tmp_path, config)).cautions == []


def test_caption_dropout_comes_from_the_text_encoder_sections(tmp_path, reference):
    # The top-level dropout_probability is OneTrainer's LoRA dropout: a fine-tune ignores it.
    config = copy.deepcopy(reference) | {"dropout_probability": 0.3}
    result = import_onetrainer(write(tmp_path, config))
    assert result.settings.training.caption_dropout_probability == 0 and result.warnings == []
    # Caption dropout is per text encoder there (text_encoder.dropout_probability, ...): one value here.
    config["text_encoder"] = {**config["text_encoder"], "dropout_probability": 0.1}
    config["text_encoder_2"] = {**config["text_encoder_2"], "dropout_probability": 0.1}
    result = import_onetrainer(write(tmp_path, config))
    assert result.settings.training.caption_dropout_probability == 0.1
    assert len(result.warnings) == 1 and "together" in result.warnings[0]  # each encoder on its own there
    config["text_encoder_2"]["dropout_probability"] = 0.0
    result = import_onetrainer(write(tmp_path, config))
    assert result.settings.training.caption_dropout_probability == 0.1
    assert "text_encoder_2.dropout_probability = 0.0" in result.warnings[0]
    sd15 = config | {"model_type": "STABLE_DIFFUSION_15", "resolution": "512"}  # one encoder: the same thing
    result = import_onetrainer(write(tmp_path, sd15))
    assert result.settings.training.caption_dropout_probability == 0.1 and result.warnings == []
    lora = config | {"training_method": "LORA", "dropout_probability": 0.2}
    lora["text_encoder_2"] = {**config["text_encoder_2"], "train": False}
    t = import_onetrainer(write(tmp_path, lora)).settings.training
    assert (t.lora.dropout, t.caption_dropout_probability) == (0.2, 0.1)
