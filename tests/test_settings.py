"""The settings model: reference defaults, profiles, overrides, and named errors."""

import tomllib

import pytest

from likeness.profiles import (
    SettingsError,
    apply_override,
    available_profiles,
    load_profile,
    parse_key_path,
    settings_to_toml,
    validate_settings,
)
from likeness.settings import Settings

TEXT = {"source": "text", "text": "ohwx man"}


def two_concepts(**second):
    return [
        {"name": "person", "path": "p", "caption": TEXT},
        {"name": "reg", "path": "r", "role": "regularization", "caption": {"source": "text", "text": "man"}} | second,
    ]


def test_defaults_are_the_reference_run():
    s = Settings()
    assert (s.training.unet.learning_rate, s.training.text_encoder.learning_rate) == (1e-5, 3e-6)
    assert s.training.unet.train and s.training.text_encoder.train and not s.training.text_encoder_2.train
    assert s.training.vae.weight_dtype == "float32" and s.training.unet.weight_dtype == "bfloat16"
    assert (s.training.batch_size, s.training.epochs, s.training.ema.enabled) == (1, 200, False)
    af = s.optimizer.adafactor
    assert (s.optimizer.name, af.eps, af.eps2, af.clip_threshold, af.decay_rate) == ("ADAFACTOR", 1e-30, 1e-3, 1.0, -0.8)
    assert s.optimizer.weight_decay == 0.01 and not (af.relative_step or af.scale_parameter or af.warmup_init)
    assert s.optimizer.fused_back_pass and s.schedule.scheduler == "CONSTANT"
    mt = s.training.masked_training
    assert (mt.enabled, mt.unmasked_weight, mt.unmasked_probability) == (True, 0.6, 0.1)
    assert (s.masks.model, s.masks.prompts, s.masks.threshold, s.masks.smooth, s.masks.expand) == (
        "CIDAS/clipseg-rd64-refined", ["head"], 0.3, 5, 10)
    assert (s.sampling.steps, s.sampling.cfg_scale, s.sampling.sampler) == (40, 7.0, "DPMPP_SDE_KARRAS")
    assert (s.saving.every, s.saving.unit, s.resize.resolution) == (15, "EPOCH", 1024)
    person, reg = s.concepts
    assert person.caption.text == "ohwx man" and person.masks and not reg.masks
    assert reg.balancing == "auto" and reg.caption.text == "man"


@pytest.mark.parametrize("name", ["demo-cpu", "sdxl-person"])
def test_shipped_profiles_load(name):
    assert name in available_profiles()
    settings = load_profile(name)
    assert settings.run.name == name


def test_demo_profile_is_small_and_cpu():
    s = load_profile("demo-cpu")
    assert s.run.device == "cpu" and s.resize.resolution <= 128 and s.training.epochs <= 10
    assert s.training.train_dtype == "float32"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"concepts": two_concepts(balancing=-1)}, "concepts[1].balancing: must be a number > 0 or 'auto', got -1"),
        ({"concepts": two_concepts(balancing="lots")}, "concepts[1].balancing: must be a number > 0 or 'auto'"),
        ({"training": {"epochs": 0}}, "training.epochs: must be >= 1 (got 0)"),
        ({"masks": {"threshold": 1.5}}, "masks.threshold: must be < 1"),
        ({"training": {"masked_training": {"unmasked_weight": 2}}}, "training.masked_training.unmasked_weight: must be <= 1"),
        ({"resize": {"resolution": 1000}}, "resize.resolution: must be a multiple of 64 (got 1000)"),
        ({"optimizer": {"name": "SGD"}}, "optimizer.name: must be one of 'ADAFACTOR' or 'ADAMW' (got 'SGD')"),
        ({"training": {"epoch": 3}}, "training.epoch: unknown field; did you mean 'epochs'?"),
        ({"trainig": {}}, "trainig: unknown field; did you mean 'training'?"),
        ({"concepts": [{"name": "a", "caption": TEXT}]}, "concepts[0].path: is required"),
        ({"concepts": [{"name": "", "path": "p", "caption": TEXT}]}, "concepts[0].name: must not be empty"),
        ({"concepts": []}, "concepts: needs at least 1 item"),
        ({"masks": {"prompts": []}}, "masks.prompts: needs at least 1 item"),
        ({"training": {"batch_size": "two"}}, "training.batch_size: Input should be a valid integer"),
        ({"run": {"device": "gpu"}}, "run.device: must match"),
        ({"concepts": [{"name": "a", "path": "p", "caption": {"source": "text"}}]}, "concepts[0].caption: source 'text' needs a non-empty 'text'"),
        ({"concepts": [{"name": "a", "path": "p", "caption": {"source": "text_file"}}]}, "concepts[0].caption: source 'text_file' needs 'path'"),
        ({"concepts": [{"name": "a", "path": "p", "caption": TEXT, "balancing": "auto"}]}, "concepts[0]: balancing 'auto' is only for regularization"),
        ({"concepts": [{"name": "a", "path": "p", "caption": TEXT}, {"name": "a", "path": "q", "caption": TEXT}]}, "concepts: names must be unique"),
        ({"concepts": [{"name": "a", "path": "p", "caption": TEXT, "validation": True}]}, "concepts: no enabled training concept"),
        ({"training": {"gradient_accumulation_steps": 4}}, "optimizer.fused_back_pass cannot be combined with training.gradient_accumulation_steps > 1"),
        ({"training": {"noise": {"min_noising_strength": 0.5, "max_noising_strength": 0.2}}}, "training.noise: min_noising_strength must be below max"),
        ({"training": {"loss": {"mse_strength": 0}}}, "training.loss: all loss strengths are 0"),
        ({"training": {"vae": {"train": True}}}, "training: vae.train: training the VAE is not supported"),
        ({"sampling": {"sampler": "DPM++ 3M"}}, "sampling.sampler: must be one of"),
        ({"saving": {"prefix": "a/b"}}, "saving.prefix: must match"),
    ],
)
def test_invalid_settings_name_the_field(data, expected):
    with pytest.raises(SettingsError) as info:
        validate_settings(data, source="bad.toml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
    assert "bad.toml" in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as info:
        validate_settings({"training": {"epochs": -1, "batch_size": 0}, "masks": {"smooth": -2}})
    assert len(info.value.problems) == 3


def test_fused_back_pass_off_allows_accumulation():
    s = validate_settings({"optimizer": {"fused_back_pass": False}, "training": {"gradient_accumulation_steps": 4}})
    assert s.training.gradient_accumulation_steps == 4


def test_a_partial_part_section_keeps_that_parts_defaults():
    s = validate_settings({"training": {"text_encoder": {"weight_dtype": "float32"}}})
    assert s.training.text_encoder.learning_rate == 3e-6  # not the optimizer's 1e-5, which burns TE1


def test_toml_round_trip_is_lossless():
    for name in available_profiles():
        settings = load_profile(name)
        assert validate_settings(tomllib.loads(settings_to_toml(settings, "a header\nline two"))) == settings


@pytest.mark.parametrize(
    ("assignment", "path", "value"),
    [
        ("training.epochs=3", ("training", "epochs"), 3),
        ("optimizer.learning_rate=2e-6", ("optimizer", "learning_rate"), 2e-6),
        ("training.ema.enabled=true", ("training", "ema", "enabled"), True),
        ('masks.prompts=["head", "face"]', ("masks", "prompts"), ["head", "face"]),
        ("run.workspace=/tmp/my ws", ("run", "workspace"), "/tmp/my ws"),
        ('concepts[1].balancing="auto"', ("concepts", 1, "balancing"), "auto"),
        ("concepts.0.path=photos/me", ("concepts", 0, "path"), "photos/me"),
    ],
)
def test_overrides(assignment, path, value):
    data = {"concepts": [{"name": "a"}, {"name": "b"}]}
    apply_override(data, assignment)
    node = data
    for part in path:
        node = node[part]
    assert node == value


def test_overrides_apply_to_a_profile():
    s = load_profile("demo-cpu", ["training.epochs=7", "concepts[0].caption.text=sks woman"])
    assert s.training.epochs == 7 and s.concepts[0].caption.text == "sks woman"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [("training.epochs", "expected key=value"), ("concepts[5].path=x", "concepts[5]"), ("a..b=1", "empty part")],
)
def test_bad_overrides(assignment, expected):
    with pytest.raises(SettingsError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        apply_override({"concepts": [{}]}, assignment)


def test_override_to_an_invalid_value_names_the_field():
    with pytest.raises(SettingsError, match=r"training\.epochs: must be >= 1"):
        load_profile("demo-cpu", ["training.epochs=0"])


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(SettingsError, match="demo-cpu.*sdxl-person"):
        load_profile("nope")


def test_broken_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nepochs = 3\n")
    with pytest.raises(SettingsError, match="bad.toml.*\n.*not valid TOML"):
        load_profile(bad)


def test_key_path_parsing():
    assert parse_key_path("concepts[1].caption.text") == ["concepts", 1, "caption", "text"]


def test_sd15_profile_is_the_reference_workflow_at_512_with_ema():
    s = load_profile("sd15-person")
    assert "sd15-person" in available_profiles() and s.run.name == "sd15-person"
    assert (s.model.model_type, s.resize.resolution, s.sampling.resolution, s.evaluation.resolution) == (
        "sd15", 512, 512, 512)
    assert s.training.ema.enabled and s.training.ema.decay == 0.999
    assert (s.training.unet.learning_rate, s.training.text_encoder.learning_rate) == (1e-5, 3e-6)
    assert s.training.text_encoder.train and s.training.masked_training.unmasked_weight == 0.6
    assert (s.optimizer.name, s.optimizer.adafactor.eps, s.optimizer.weight_decay) == ("ADAFACTOR", 1e-30, 0.01)
    person, reg = s.concepts
    assert person.caption.text == "ohwx man" and reg.balancing == "auto"


def test_model_type_accepts_auto_sdxl_and_sd15_only():
    assert Settings().model.model_type == "sdxl"
    for value in ("auto", "sdxl", "sd15"):
        assert validate_settings({"model": {"model_type": value}}).model.model_type == value
    with pytest.raises(SettingsError, match="model.model_type"):
        validate_settings({"model": {"model_type": "sd21"}})
