"""OneTrainer import: the reference config converts and loads; unsupported settings are listed."""

import copy
import json
from pathlib import Path

import pytest

from likeness.trainer.onetrainer import OneTrainerImportError, import_onetrainer
from likeness.trainer.profiles import load_profile, write_profile

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
    config.update(tensorboard=True, aspect_ratio_bucketing=True, loss_scaler="BATCH", foo_bar=3,
                  learning_rate_scheduler="REX", rolling_backup=False, backup_after_unit="MINUTE")
    config["concepts"][0]["image"]["enable_random_flip"] = True
    config["concepts"][0]["text"]["enable_tag_shuffling"] = True
    config["optimizer"]["nesterov"] = True
    config["samples"][1]["cfg_scale"] = 5.0
    warnings = "\n".join(import_onetrainer(write(tmp_path, config)).warnings)
    for expected in ["tensorboard = true", "aspect_ratio_bucketing = true", 'loss_scaler = "BATCH"',
                     "foo_bar = 3: unknown OneTrainer setting", 'learning_rate_scheduler = "REX"',
                     "rolling_backup = false", "concepts[0].image.enable_random_flip = true",
                     "concepts[0].text.enable_tag_shuffling = true", "optimizer.nesterov = true",
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
        ({"model_type": "STABLE_DIFFUSION_15"}, "model_type 'STABLE_DIFFUSION_15' is not supported"),
        ({"training_method": "LORA"}, "training_method 'LORA' is not supported"),
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
