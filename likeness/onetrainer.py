"""Import a OneTrainer config (`__version` 6, SDXL or SD 1.5 fine-tune, or SDXL LoRA) into likeness settings.

    likeness import-onetrainer config.json -o profiles/mine.toml

Settings we support map 1:1. A OneTrainer setting we do not support is listed in a warning when
its value asks for behaviour likeness does not have (an augmentation turned on, TensorBoard on,
...); left at its neutral value it is ignored quietly. Keys we do not know at all are warned about
too, never silently dropped. Aspect-ratio bucketing, the concepts' image augmentations
(`concept.image.enable_*`) and tag shuffling (`concept.text`) map to resize.mode, Concept.augmentations
and CaptionSource. Facts: shared/reference/onetrainer-behaviour.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from likeness.errors import BadInputError
from likeness.profiles import SettingsError, validate_settings
from likeness.settings import Settings

SUPPORTED_VERSION = 6
MODEL_TYPES = {"STABLE_DIFFUSION_XL_10_BASE": "sdxl", "STABLE_DIFFUSION_15": "sd15"}
# concept.image toggles: our field <- (OneTrainer's random key, fixed key, max-strength key)
TOGGLES = {
    "flip": ("enable_random_flip", "enable_fixed_flip", None),
    "rotate": ("enable_random_rotate", "enable_fixed_rotate", "random_rotate_max_angle"),
    "brightness": ("enable_random_brightness", "enable_fixed_brightness", "random_brightness_max_strength"),
    "contrast": ("enable_random_contrast", "enable_fixed_contrast", "random_contrast_max_strength"),
    "saturation": ("enable_random_saturation", "enable_fixed_saturation", "random_saturation_max_strength"),
    "hue": ("enable_random_hue", "enable_fixed_hue", "random_hue_max_strength"),
}
IMAGE_FLAGS = {"enable_crop_jitter": "crop_jitter", "enable_random_mask_rotate_crop": "mask_rotate_crop",
               "enable_random_circular_mask_shrink": "circular_mask_shrink"}
IMAGE_SUPPORTED = ({k for keys in TOGGLES.values() for k in keys if k} | set(IMAGE_FLAGS)
                   | {"__version"})
DTYPES = {"FLOAT_32": "float32", "BFLOAT_16": "bfloat16", "FLOAT_16": "float16"}

# OneTrainer key -> our dotted field (values copied as they are).
DIRECT = {
    "workspace_dir": "run.workspace",
    "base_model_name": "model.base_model",
    "output_model_destination": "run.output_destination",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "ema_decay": "training.ema.decay",
    "ema_update_step_interval": "training.ema.update_step_interval",
    "mse_strength": "training.loss.mse_strength",
    "mae_strength": "training.loss.mae_strength",
    "log_cosh_strength": "training.loss.log_cosh_strength",
    "loss_weight_fn": "training.loss.weight_fn",
    "loss_weight_strength": "training.loss.weight_strength",
    "offset_noise_weight": "training.noise.offset_noise_weight",
    "perturbation_noise_weight": "training.noise.perturbation_noise_weight",
    "min_noising_strength": "training.noise.min_noising_strength",
    "max_noising_strength": "training.noise.max_noising_strength",
    "timestep_distribution": "training.noise.timestep_distribution",
    "noising_weight": "training.noise.noising_weight",
    "noising_bias": "training.noise.noising_bias",
    "masked_training": "training.masked_training.enabled",
    "unmasked_probability": "training.masked_training.unmasked_probability",
    "unmasked_weight": "training.masked_training.unmasked_weight",
    "normalize_masked_area_loss": "training.masked_training.normalize_masked_area_loss",
    "learning_rate": "optimizer.learning_rate",
    "learning_rate_warmup_steps": "schedule.warmup_steps",
    "learning_rate_cycles": "schedule.cycles",
    "rolling_backup_count": "backups.rolling_count",
    "backup_before_save": "backups.before_save",
    "save_skip_first": "saving.skip_first",
}

# Keys handled by a converter below, or with no meaning for an SDXL full fine-tune.
HANDLED = {
    "__version", "training_method", "model_type", "concepts", "samples", "optimizer", "weight_dtype",
    "output_dtype", "train_dtype", "output_model_format", "gradient_checkpointing", "resolution",
    "learning_rate_scheduler", "ema", "train_device", "force_v_prediction", "force_epsilon_prediction",
    "unet", "text_encoder", "text_encoder_2", "vae", "text_encoder_layer_skip", "text_encoder_2_layer_skip",
    "sample_after", "sample_after_unit", "sample_image_format", "save_every", "save_every_unit",
    "save_filename_prefix", "backup_after", "backup_after_unit", "rolling_backup", "aspect_ratio_bucketing",
    # OneTrainer's LoRA dropout (its LoRA and LyCORIS modules read it; a fine-tune never does): _convert_lora
    "dropout_probability",
    # meaningless for SDXL full fine-tunes (other model families, LoRA, embeddings) or run mechanics
    "prior", "text_encoder_3", "text_encoder_3_layer_skip", "effnet_encoder", "decoder",
    "decoder_text_encoder", "decoder_vqgan", "embedding", "embedding_learning_rate", "embedding_weight_dtype",
    "preserve_embedding_norm", "peft_type", "lora_model_name", "lora_rank", "lora_alpha", "lora_decompose",
    "lora_decompose_norm_epsilon", "lora_weight_dtype", "lora_layers", "lora_layer_preset",
    "bundle_additional_embeddings", "optimizer_defaults", "concept_file_name", "sample_definition_file_name",
    "cache_dir", "clear_cache_before_training", "continue_last_backup", "include_train_config",
    "dataloader_threads", "temp_device", "fallback_train_dtype", "enable_autocast_cache",
    "attention_mechanism", "vb_loss_strength", "validate_after", "validate_after_unit", "debug_dir",
    "samples_to_tensorboard", "non_ema_sampling", "validation", "align_prop_probability", "align_prop_loss",
    "align_prop_weight", "align_prop_steps", "align_prop_truncate_steps", "align_prop_cfg_scale",
}

# Unsupported settings and the value at which ignoring them changes nothing.
NEUTRAL = {
    "debug_mode": False, "tensorboard": False, "tensorboard_expose": False, "force_circular_padding": False,
    "latent_caching": True, "only_cache": False, "align_prop": False,
    "loss_scaler": "NONE", "learning_rate_scaler": "NONE", "custom_learning_rate_scheduler": None,
    "scheduler_params": [], "rescale_noise_scheduler_to_zero_terminal_snr": False, "additional_embeddings": [],
    "huber_strength": 0.0,
}
OPTIMIZER_FIELDS = {
    "ADAFACTOR": {"eps": "adafactor.eps", "eps2": "adafactor.eps2", "clip_threshold": "adafactor.clip_threshold",
                  "decay_rate": "adafactor.decay_rate", "beta1": "adafactor.beta1",
                  "relative_step": "adafactor.relative_step", "scale_parameter": "adafactor.scale_parameter",
                  "warmup_init": "adafactor.warmup_init"},
    "ADAMW": {"beta1": "adamw.beta1", "beta2": "adamw.beta2", "eps": "adamw.eps"},
}
OPTIMIZER_COMMON = {"weight_decay": "weight_decay", "fused_back_pass": "fused_back_pass",
                    "stochastic_rounding": "stochastic_rounding"}
PART_NEUTRAL = {"model_name": "", "dropout_probability": 0.0, "include": True}  # text encoders: caption dropout
SCHEDULERS = {"CONSTANT", "LINEAR", "COSINE", "COSINE_WITH_RESTARTS"}
PROMPT_SOURCES = {"concept": "text_file", "sample": "per_image", "filename": "filename"}


class OneTrainerImportError(BadInputError, ValueError):
    """The config cannot be imported at all (wrong model type, training method, version, JSON)."""


@dataclass
class ImportResult:
    settings: Settings
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cautions: list[str] = field(default_factory=list)  # imported as is, but likely not what the user wants


def import_onetrainer(path: str | Path) -> ImportResult:
    """Read a OneTrainer JSON config and convert it into validated `Settings`."""
    path = Path(path)
    config = _read_json(path)
    _check_supported(config, path)
    out: dict[str, Any] = {}
    warnings: list[str] = []
    notes: list[str] = []
    for key, value in config.items():
        if key in DIRECT:
            if value is not None:
                _set(out, DIRECT[key], value)
        elif key in NEUTRAL:
            if value != NEUTRAL[key]:
                warnings.append(f"{key} = {json.dumps(value)}: not supported by likeness, ignored")
        elif key not in HANDLED:
            warnings.append(f"{key} = {json.dumps(value)}: unknown OneTrainer setting, ignored")
    _convert_globals(config, out, warnings)
    _convert_parts(config, out, warnings)
    _convert_optimizer(config.get("optimizer") or {}, out, warnings)
    if config.get("training_method") == "LORA":
        _convert_lora(config, out, warnings)
    _convert_sampling(config, out, warnings)
    out["concepts"] = [_convert_concept(c, i, warnings, notes) for i, c in enumerate(config.get("concepts") or [])]
    if not out["concepts"]:
        raise OneTrainerImportError(f"{path}: no concepts in the config (concepts from a separate concept file are not read)")
    try:
        settings = validate_settings(out, source=f"settings imported from {path}")
    except SettingsError as exc:
        raise OneTrainerImportError(str(exc)) from None
    return ImportResult(settings, warnings, notes, cautions(settings))


def cautions(settings: Settings) -> list[str]:
    """Imported settings that work against the run (docs/onetrainer.md)."""
    bf16 = [part for part in ("unet", "text_encoder", "text_encoder_2")
            if getattr(settings.training, part).train and getattr(settings.training, part).weight_dtype == "bfloat16"]
    if settings.optimizer.stochastic_rounding or not bf16:
        return []
    rate = settings.training.unet.learning_rate or settings.optimizer.learning_rate
    return [f"optimizer.stochastic_rounding = false with bfloat16 weights ({', '.join(bf16)}): rounding each "
            f"update to the nearest bf16 value drops most updates at learning rates like "
            f"{rate:g} (about 60 % of the weights never move in 300 steps); "
            "likeness's default is true: --set optimizer.stochastic_rounding=true (docs/onetrainer.md)"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OneTrainerImportError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise OneTrainerImportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise OneTrainerImportError(f"{path}: expected a JSON object (a OneTrainer config)")
    return config


def _check_supported(config: dict[str, Any], path: Path) -> None:
    version = config.get("__version")
    if version != SUPPORTED_VERSION:
        raise OneTrainerImportError(
            f"{path}: __version {version!r} is not supported; likeness imports OneTrainer configs of "
            f"__version {SUPPORTED_VERSION} (saved by OneTrainer between 2024-10 and 2025-08)")
    if config.get("training_method") not in ("FINE_TUNE", "LORA"):
        raise OneTrainerImportError(
            f"{path}: training_method {config.get('training_method')!r} is not supported; "
            "likeness does full fine-tunes and LoRAs (training_method FINE_TUNE or LORA)")
    if config.get("model_type") not in MODEL_TYPES:
        raise OneTrainerImportError(
            f"{path}: model_type {config.get('model_type')!r} is not supported; "
            f"likeness trains {', '.join(sorted(MODEL_TYPES))}")


def _set(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _dtype(value: str | None, key: str, warnings: list[str], fallback: str | None = None) -> str | None:
    if value in (None, "NONE"):
        return fallback
    if value not in DTYPES:
        warnings.append(f"{key} = {json.dumps(value)}: dtype not supported, using {fallback or 'the default'}")
        return fallback
    return DTYPES[value]


def _unit_every(every: int, unit: str) -> tuple[int, str]:
    """OneTrainer allows 0 to mean 'never'; we say NEVER."""
    return (1, "NEVER") if every <= 0 or unit == "NEVER" else (every, unit)


def _convert_globals(config: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    _set(out, "model.model_type", MODEL_TYPES[config["model_type"]])
    _set(out, "resize.mode", "bucket" if config.get("aspect_ratio_bucketing") else "pad")
    for key, dotted in (("train_dtype", "training.train_dtype"), ("output_dtype", "training.output_dtype")):
        if (dtype := _dtype(config.get(key), key, warnings)) is not None:
            _set(out, dotted, dtype)
    checkpointing = config.get("gradient_checkpointing", "ON")
    _set(out, "training.gradient_checkpointing", checkpointing != "OFF")
    if checkpointing == "CPU_OFFLOADED":
        warnings.append('gradient_checkpointing = "CPU_OFFLOADED": not supported, using ordinary checkpointing')
    resolution = str(config.get("resolution", "1024"))
    if not resolution.isdigit():
        warnings.append(f"resolution = {json.dumps(resolution)}: multi-resolution training not supported, "
                        "using the first value")
        resolution = "".join(ch for ch in resolution.replace("x", ",").split(",")[0] if ch.isdigit()) or "1024"
    _set(out, "resize.resolution", int(resolution))
    scheduler = config.get("learning_rate_scheduler", "CONSTANT")
    if scheduler not in SCHEDULERS:
        warnings.append(f"learning_rate_scheduler = {json.dumps(scheduler)}: not supported, using CONSTANT")
        scheduler = "CONSTANT"
    _set(out, "schedule.scheduler", scheduler)
    ema = config.get("ema", "OFF")
    _set(out, "training.ema.enabled", ema != "OFF")
    _set(out, "training.ema.on_cpu", ema == "CPU")
    device = str(config.get("train_device", "cuda"))
    _set(out, "run.device", device if device in ("cpu", "mps") or device.startswith("cuda") else "auto")
    if config.get("force_v_prediction"):
        _set(out, "training.noise.prediction_type", "v_prediction")
    elif config.get("force_epsilon_prediction"):
        _set(out, "training.noise.prediction_type", "epsilon")
    fmt = config.get("output_model_format", "SAFETENSORS")
    _set(out, "saving.format", "diffusers" if fmt == "DIFFUSERS" else "safetensors")
    if fmt not in ("SAFETENSORS", "DIFFUSERS"):
        warnings.append(f"output_model_format = {json.dumps(fmt)}: not supported, saving single-file safetensors")
    every, unit = _unit_every(config.get("save_every", 0), config.get("save_every_unit", "NEVER"))
    _set(out, "saving.every", every)
    _set(out, "saving.unit", unit)
    prefix = config.get("save_filename_prefix") or Path(str(config.get("output_model_destination") or "model")).stem
    _set(out, "saving.prefix", prefix)
    every, unit = _unit_every(config.get("backup_after", 30), config.get("backup_after_unit", "MINUTE"))
    _set(out, "backups.every", every)
    _set(out, "backups.unit", unit)
    if not config.get("rolling_backup", False) and unit != "NEVER":
        warnings.append("rolling_backup = false: likeness always keeps only the newest backups "
                        "(backups.rolling_count)")


def _convert_parts(config: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    global_dtype = _dtype(config.get("weight_dtype"), "weight_dtype", warnings, fallback="float32")
    sd15 = MODEL_TYPES[config["model_type"]] == "sd15"
    if sd15:  # one text encoder: OneTrainer's text_encoder_2 section means nothing there
        _set(out, "training.text_encoder_2.train", False)
    for part in ("unet", "text_encoder", "vae") if sd15 else ("unet", "text_encoder", "text_encoder_2", "vae"):
        section = config.get(part) or {}
        target = f"training.{part}"
        dtype = _dtype(section.get("weight_dtype"), f"{part}.weight_dtype", warnings, fallback=global_dtype)
        _set(out, f"{target}.weight_dtype", dtype)
        for key, neutral in PART_NEUTRAL.items():
            if key == "dropout_probability" and part.startswith("text_encoder"):
                continue  # caption dropout: _convert_caption_dropout
            if key in section and section[key] != neutral:
                warnings.append(f"{part}.{key} = {json.dumps(section[key])}: not supported, ignored")
        if part == "vae":  # OneTrainer never trains the VAE in a fine-tune, whatever vae.train says
            continue
        _set(out, f"{target}.train", bool(section.get("train", part != "text_encoder_2")))
        if section.get("learning_rate") is not None:
            _set(out, f"{target}.learning_rate", section["learning_rate"])
        unit = section.get("stop_training_after_unit", "NEVER")
        _set(out, f"{target}.stop_training_after_unit", unit if unit in ("EPOCH", "STEP") else "NEVER")
        if unit not in ("EPOCH", "STEP", "NEVER"):
            warnings.append(f"{part}.stop_training_after_unit = {json.dumps(unit)}: not supported, using NEVER")
        _set(out, f"{target}.stop_training_after", int(section.get("stop_training_after") or 0))
    for key, part in (("text_encoder_layer_skip", "text_encoder"), ("text_encoder_2_layer_skip", "text_encoder_2")):
        if not (sd15 and part == "text_encoder_2"):
            _set(out, f"training.{part}.clip_skip", int(config.get(key, 0)))
    _convert_caption_dropout(config, ("text_encoder",) if sd15 else ("text_encoder", "text_encoder_2"), out, warnings)


def _convert_caption_dropout(config: dict[str, Any], parts: tuple[str, ...], out: dict[str, Any],
                             warnings: list[str]) -> None:
    """OneTrainer's caption dropout is per text encoder (`<part>.dropout_probability`: that encoder's
    conditioning zeroed, each encoder drawn on its own); likeness zeroes all of it together with one
    `training.caption_dropout_probability`. (The top-level `dropout_probability` is the LoRA's.)"""
    found = {part: float((config.get(part) or {}).get("dropout_probability") or 0.0) for part in parts}
    probability = max(found.values())
    if probability > 0:
        _set(out, "training.caption_dropout_probability", probability)
    if len(set(found.values())) > 1 or (probability > 0 and len(parts) > 1):
        given = ", ".join(f"{part}.dropout_probability = {p}" for part, p in found.items())
        warnings.append(f"{given}: likeness drops the captions of all text encoders together, "
                        f"with training.caption_dropout_probability = {probability}")


def _convert_lora(config: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    """training_method LORA: OneTrainer's lora_* settings -> training.lora (its dropout_probability is the LoRA's)."""
    from likeness.models.lora import LAYER_PRESETS

    _set(out, "training.method", "lora")
    lora: dict[str, Any] = {"rank": config.get("lora_rank", 16), "alpha": config.get("lora_alpha", 1.0),
                            "dropout": config.get("dropout_probability") or 0.0}
    if (dtype := _dtype(config.get("lora_weight_dtype"), "lora_weight_dtype", warnings)) is not None:
        lora["weight_dtype"] = dtype
    preset = config.get("lora_layer_preset")
    layers = [f.strip() for f in (config.get("lora_layers") or "").split(",") if f.strip()]
    if preset in LAYER_PRESETS:
        lora["layer_preset"] = preset
    if layers != LAYER_PRESETS.get(preset, []) or (preset not in LAYER_PRESETS and not layers):
        if layers:
            lora["layers"] = layers
        else:
            lora["layer_preset"] = "full"  # an empty OneTrainer filter adapts every layer
    out.setdefault("training", {})["lora"] = lora
    if config.get("model_type") != "STABLE_DIFFUSION_XL_10_BASE":
        raise OneTrainerImportError(f"training_method LORA: model_type {config.get('model_type')!r} is not supported; "
                                    "likeness trains LoRAs on SDXL only")
    if config.get("peft_type", "LORA") != "LORA":
        warnings.append(f"peft_type = {json.dumps(config['peft_type'])}: not supported, training a plain LoRA")
    if config.get("lora_decompose"):
        warnings.append("lora_decompose = true (DoRA): not supported, training a plain LoRA")
    if config.get("lora_model_name"):
        warnings.append(f"lora_model_name = {json.dumps(config['lora_model_name'])}: continuing an existing LoRA "
                        "is not supported, starting a new one")
    if out.get("training", {}).get("text_encoder_2", {}).get("train"):
        warnings.append("text_encoder_2.train = true: likeness trains LoRAs on the UNet and text encoder 1 only, "
                        "text encoder 2 stays frozen")
        out["training"]["text_encoder_2"]["train"] = False


def _convert_optimizer(optimizer: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    name = optimizer.get("optimizer", "ADAFACTOR")
    if name not in OPTIMIZER_FIELDS:
        warnings.append(f"optimizer.optimizer = {json.dumps(name)}: not supported, using ADAFACTOR with its "
                        "reference settings")
        return
    _set(out, "optimizer.name", name)
    mapped = OPTIMIZER_FIELDS[name] | OPTIMIZER_COMMON
    for key, value in optimizer.items():
        if key in mapped:
            if value is not None or key == "beta1":
                _set(out, f"optimizer.{mapped[key]}", value)
        elif key not in ("__version", "optimizer") and value not in (None, False):
            warnings.append(f"optimizer.{key} = {json.dumps(value)}: not supported for {name}, ignored")


def _convert_sampling(config: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    every, unit = _unit_every(config.get("sample_after", 10), config.get("sample_after_unit", "MINUTE"))
    _set(out, "sampling.every", every)
    _set(out, "sampling.unit", unit)
    _set(out, "sampling.image_format", "png" if config.get("sample_image_format") == "PNG" else "jpg")
    samples = [s for s in config.get("samples") or [] if s.get("enabled", True)]
    if not samples:
        return
    first = samples[0]
    shared = {"diffusion_steps": "steps", "cfg_scale": "cfg_scale", "noise_scheduler": "sampler"}
    for key, ours in shared.items():
        _set(out, f"sampling.{ours}", first[key])
        if any(s.get(key) != first[key] for s in samples):
            warnings.append(f"samples[*].{key}: differs between samples; likeness uses one value for all "
                            f"({json.dumps(first[key])})")
    if first.get("height") != first.get("width"):
        warnings.append("samples[0].height != width: likeness samples square images, using the width")
    _set(out, "sampling.resolution", int(first.get("width", 1024)) // 64 * 64)
    for i, sample in enumerate(samples):
        if sample.get("sample_inpainting") or sample.get("force_last_timestep"):
            warnings.append(f"samples[{i}]: inpainting / force_last_timestep not supported, ignored")
    out["sampling"]["prompts"] = [
        {"prompt": s["prompt"], "negative_prompt": s.get("negative_prompt", ""),
         "seed": s.get("seed", 42), "random_seed": bool(s.get("random_seed", False))}
        for s in samples
    ]


def _convert_concept(concept: dict[str, Any], index: int, warnings: list[str], notes: list[str]) -> dict[str, Any]:
    where = f"concepts[{index}]"
    text = concept.get("text") or {}
    source = PROMPT_SOURCES.get(text.get("prompt_source", "sample"))
    if source is None:
        raise OneTrainerImportError(f"{where}.text.prompt_source = {text.get('prompt_source')!r}: unknown")
    caption: dict[str, Any] = {"source": source}
    if source == "text_file":
        caption["path"] = text.get("prompt_path", "")
    if text.get("enable_tag_shuffling"):
        caption.update(shuffle_tags=True, tag_delimiter=text.get("tag_delimiter") or ",",
                       keep_tags=int(text.get("keep_tags_count", 1)))
    balancing = concept.get("balancing", 1.0)
    role = _guess_role(concept)
    notes.append(f"{where} {concept.get('name')!r}: role {role} (balancing {balancing})")
    return {
        "name": concept.get("name") or f"concept-{index}", "path": concept.get("path", ""), "role": role,
        "enabled": concept.get("enabled", True), "include_subdirectories": concept.get("include_subdirectories", False),
        "caption": caption, "balancing": balancing, "balancing_strategy": concept.get("balancing_strategy", "REPEATS"),
        "loss_weight": concept.get("loss_weight", 1.0), "validation": concept.get("validation_concept", False),
        "image_variations": concept.get("image_variations", 1), "text_variations": concept.get("text_variations", 1),
        "augmentations": _convert_augmentations(concept.get("image") or {}, where, warnings),
    }


def _convert_augmentations(image: dict[str, Any], where: str, warnings: list[str]) -> dict[str, Any]:
    """OneTrainer's concept.image -> ImageAugmentations; fixed wins where both toggles are on (it always applies)."""
    out: dict[str, Any] = {ours: True for key, ours in IMAGE_FLAGS.items() if image.get(key)}
    for ours, (random_key, fixed_key, strength_key) in TOGGLES.items():
        mode = "fixed" if image.get(fixed_key) else "random" if image.get(random_key) else None
        if mode is None:
            continue
        out[ours] = mode
        if strength_key is not None:
            out[f"{ours}_max_angle" if ours == "rotate" else f"{ours}_max_strength"] = image.get(strength_key, 0.0)
    for key, value in image.items():
        if key not in IMAGE_SUPPORTED and key.startswith("enable_") and value:  # enable_resolution_override
            warnings.append(f"{where}.image.{key} = true: not supported, ignored")
    return out


def _guess_role(concept: dict[str, Any]) -> str:
    """OneTrainer has no roles: a concept named like one, or sampled at under one per image, regularizes."""
    label = f"{concept.get('name', '')} {concept.get('path', '')}".lower()
    fractional = concept.get("balancing_strategy", "REPEATS") == "REPEATS" and concept.get("balancing", 1.0) < 1
    return "regularization" if fractional or "regulari" in label or "class" in label else "subject"
