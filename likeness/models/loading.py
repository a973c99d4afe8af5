"""Loading the base SDXL or SD 1.5 model, CLIPSeg, DINO and CLIP, the same way for real and tiny models.

`base_model` may be a diffusers folder (with model_index.json), a single-file `.safetensors` /
`.ckpt` checkpoint (RealVisXL and friends; `config` names a diffusers folder or hub id holding
the component configs, which offline use and non-standard shapes need), or a hub id such as
`stabilityai/stable-diffusion-xl-base-1.0`. With HF_HUB_OFFLINE=1 hub ids resolve from the local
cache only.

    pipe = load_sdxl_pipeline("workspace/demo/models/sdxl")
    pipe = load_sdxl_pipeline("realvisxlV40.safetensors", config="stabilityai/stable-diffusion-xl-base-1.0",
                              dtype=torch.bfloat16)
    pipe = load_sdxl_pipeline(folder, dtype={"unet": torch.bfloat16, "vae": torch.float32})  # per part, see part_dtypes
    pipe = load_pipeline("sd15-folder-or-file", config=...)   # SDXL or SD 1.5: model_family() decides
    model, processor = load_clipseg("CIDAS/clipseg-rd64-refined")
    model, image_processor = load_dino("facebook/dino-vits16")       # evaluation: DINO likeness
    model, processor = load_clip("openai/clip-vit-large-patch14")     # evaluation: CLIP-I and CLIP-T
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    ViTModel,
)

from likeness.models.part_dtypes import DtypeSpec, dtype_kwargs, single_file_pipeline

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# Key prefixes every SDXL base checkpoint in the original (single-file) layout has.
SDXL_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.1.")
HOW_TO_GIVE = "give a diffusers SDXL folder, a hub id or a single-file .safetensors checkpoint"


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` is shaped like a hub repo id (`repo` or `namespace/repo`) and is not a local path."""
    return not is_local_path(name)


def is_local_path(name: str | Path) -> bool:
    """Whether `name` means a local file or folder rather than a hub id.

    Local: a Path object, anything that exists, anything starting with /, ./, ../ or ~, a name
    with a backslash or a checkpoint suffix, and anything that is not a valid repo id (such as
    `workspace/demo/models/sdxl`, which has more than one slash). A missing `models/sdxl` is a
    hub id, as for `from_pretrained`.
    """
    if isinstance(name, Path):
        return True
    text = str(name)
    if Path(text).expanduser().exists() or "\\" in text:
        return True
    if text.startswith(("/", "./", "../", "~")) or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def is_single_file(name: str | Path) -> bool:
    """Whether `name` names a single-file checkpoint (by suffix; it may not exist yet)."""
    return str(name).lower().endswith(CHECKPOINT_SUFFIXES)


def load_sdxl_pipeline(
    base_model: str | Path,
    *,
    config: str | Path | None = None,
    dtype: DtypeSpec = None,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StableDiffusionXLPipeline:
    """Load an SDXL pipeline from a single-file checkpoint, a diffusers folder or a hub id.

    Every part is created directly in its dtype of `dtype` (one dtype, or one per part: see
    `part_dtypes`); None keeps diffusers' default (float32). `torch_dtype` is the old name of `dtype`.
    Raises FileNotFoundError when a local path does not exist and ValueError when it is not an
    SDXL model; both messages name the path.
    """
    spec = torch_dtype if dtype is None else dtype
    kwargs = _hub_kwargs(spec, local_files_only)
    if is_local_path(base_model):
        path = Path(base_model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder; {HOW_TO_GIVE}")
        if path.is_dir():
            check_diffusers_sdxl_folder(path)
            return StableDiffusionXLPipeline.from_pretrained(str(path), **kwargs)
        return _load_single_file(path, config, spec, _hub_kwargs(None, local_files_only))
    try:
        return StableDiffusionXLPipeline.from_pretrained(str(base_model), **kwargs)
    except OSError as error:  # not cached while offline, no such repo, ...
        raise OSError(f"{base_model}: could not load it as a hub id (it is no local path): {error}") from error


def check_diffusers_sdxl_folder(folder: Path) -> None:
    """Raise ValueError naming `folder` unless it is a diffusers folder with every SDXL component."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder}: not a diffusers folder (no model_index.json); {HOW_TO_GIVE}")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as error:
        raise ValueError(f"{index_file}: not valid JSON ({error})") from error
    missing = [name for name in SDXL_COMPONENTS if not index.get(name) or index[name] == [None, None]]
    if missing:
        raise ValueError(
            f"{folder}: not an SDXL model ({index.get('_class_name', 'unknown pipeline')} lacks "
            f"{', '.join(missing)}); {HOW_TO_GIVE}")


def _load_single_file(path: Path, config: str | Path | None, spec: DtypeSpec,
                      kwargs: dict[str, Any]) -> StableDiffusionXLPipeline:
    if not is_single_file(path):
        raise ValueError(f"{path}: not a .safetensors or .ckpt checkpoint; {HOW_TO_GIVE}")
    if path.suffix.lower() == ".safetensors":
        check_sdxl_single_file(path)
    if config is not None and is_local_path(config):
        config = Path(config).expanduser()
        if not config.exists():
            raise FileNotFoundError(
                f"{config}: no such config folder (for {path}); give a diffusers SDXL folder or hub id")
        check_diffusers_sdxl_folder(config)
    config_arg = None if config is None else str(config)
    return single_file_pipeline(StableDiffusionXLPipeline, str(path), config_arg, spec, kwargs)


def check_sdxl_single_file(path: Path) -> None:
    """Raise ValueError naming `path` unless its keys look like an SDXL base checkpoint (header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error
    absent = [p for p in SDXL_SINGLE_FILE_PREFIXES if not any(k.startswith(p) for k in keys)]
    if absent:
        raise ValueError(f"{path}: not an SDXL checkpoint (no {' or '.join(absent)}* keys); {HOW_TO_GIVE}")


def _hub_kwargs(spec: DtypeSpec, local_files_only: bool | None) -> dict[str, Any]:
    """Only the options given: None keeps each library's default (HF_HUB_OFFLINE still applies)."""
    kwargs: dict[str, Any] = dtype_kwargs(spec)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return kwargs


# --- model families: SDXL and SD 1.5 ---------------------------------------------------------

Family = Literal["sdxl", "sd15"]
SD15_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD15_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "cond_stage_model.transformer.")
FAMILY_BY_PIPELINE = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
                      "StableDiffusionPipeline": "sd15", "StableDiffusionImg2ImgPipeline": "sd15"}
SET_IT = "set model.model_type to 'sdxl' or 'sd15'"


def model_family(base_model: str | Path, config: str | Path | None = None) -> Family:
    """"sdxl" or "sd15", from a diffusers folder's model_index.json, a single file's key names, or a
    hub id's model_index.json (from the local cache when offline). ValueError naming the model otherwise."""
    if is_local_path(base_model):
        path = Path(base_model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder; give a diffusers folder, a hub id or a "
                                    "single-file .safetensors checkpoint")
        if path.is_dir():
            return _family_of_index(_read_index(path / "model_index.json"), path)
        return _family_of_single_file(path, config)
    return _family_of_hub_id(str(base_model))


def resolve_family(model_type: str, base_model: str | Path, config: str | Path | None = None) -> Family:
    """settings.model.model_type as a family: "auto" detects it from the base model."""
    if model_type in ("sdxl", "sd15"):
        return model_type  # type: ignore[return-value]
    if model_type != "auto":
        raise ValueError(f"model.model_type: unknown value {model_type!r}; use 'auto', 'sdxl' or 'sd15'")
    return model_family(base_model, config)


def _read_index(index_file: Path) -> dict[str, Any]:
    if not index_file.is_file():
        raise ValueError(f"{index_file.parent}: not a diffusers folder (no model_index.json); {HOW_TO_GIVE}")
    try:
        return json.loads(index_file.read_text())
    except ValueError as error:
        raise ValueError(f"{index_file}: not valid JSON ({error})") from error


def _family_of_index(index: dict[str, Any], where: str | Path) -> Family:
    name = index.get("_class_name", "")
    if name in FAMILY_BY_PIPELINE:
        return FAMILY_BY_PIPELINE[name]  # type: ignore[return-value]
    if index.get("text_encoder_2") not in (None, [None, None]):
        return "sdxl"
    if index.get("text_encoder") not in (None, [None, None]) and index.get("unet"):
        return "sd15"
    raise ValueError(f"{where}: cannot tell the model family of a {name or 'unknown'} pipeline; {SET_IT}")


def _family_of_single_file(path: Path, config: str | Path | None) -> Family:
    if not is_single_file(path):
        raise ValueError(f"{path}: not a .safetensors or .ckpt checkpoint; {HOW_TO_GIVE}")
    if path.suffix.lower() != ".safetensors":  # a pickled .ckpt cannot be read safely by its header
        if config is not None:
            return model_family(config)
        raise ValueError(f"{path}: cannot detect the model family of a .ckpt file; {SET_IT}")
    keys = _single_file_keys(path)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    raise ValueError(f"{path}: neither SDXL (conditioner.embedders.*) nor SD 1.5 (cond_stage_model.transformer.*) "
                     f"keys; {SET_IT} or give another checkpoint")


def _family_of_hub_id(repo_id: str) -> Family:
    from huggingface_hub import hf_hub_download

    try:
        index_file = hf_hub_download(repo_id, "model_index.json")
    except Exception as error:  # offline and not cached, no such repo, no model_index.json, ...
        raise ValueError(f"{repo_id}: could not read its model_index.json to detect the model family ({error}); "
                         f"{SET_IT}") from error
    return _family_of_index(_read_index(Path(index_file)), repo_id)


def _single_file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error


def check_diffusers_sd15_folder(folder: Path) -> None:
    """Raise ValueError naming `folder` unless it is a diffusers folder with every SD 1.5 component."""
    index = _read_index(folder / "model_index.json")
    missing = [name for name in SD15_COMPONENTS if not index.get(name) or index[name] == [None, None]]
    if missing or index.get("text_encoder_2") not in (None, [None, None]):
        what = f"lacks {', '.join(missing)}" if missing else "has a second text encoder (SDXL?)"
        raise ValueError(f"{folder}: not an SD 1.5 model ({index.get('_class_name', 'unknown pipeline')} {what}); "
                         "give a diffusers SD 1.5 folder, a hub id or a single-file checkpoint")


def load_sd15_pipeline(
    base_model: str | Path,
    *,
    config: str | Path | None = None,
    dtype: DtypeSpec = None,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """Load an SD 1.5 pipeline (no safety checker) from a single-file checkpoint, a diffusers folder or a hub id;
    `dtype` as for `load_sdxl_pipeline`."""
    spec = torch_dtype if dtype is None else dtype
    kwargs = _hub_kwargs(spec, local_files_only) | {"safety_checker": None, "requires_safety_checker": False}
    if not is_local_path(base_model):
        try:
            return StableDiffusionPipeline.from_pretrained(str(base_model), **kwargs)
        except OSError as error:
            raise OSError(f"{base_model}: could not load it as a hub id (it is no local path): {error}") from error
    path = Path(base_model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; give a diffusers SD 1.5 folder, a hub id or "
                                "a single-file .safetensors checkpoint")
    if path.is_dir():
        check_diffusers_sd15_folder(path)
        return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    if not is_single_file(path):
        raise ValueError(f"{path}: not a .safetensors or .ckpt checkpoint; {HOW_TO_GIVE}")
    if path.suffix.lower() == ".safetensors" and _family_of_single_file(path, config) != "sd15":
        raise ValueError(f"{path}: not an SD 1.5 checkpoint (it has SDXL keys); set model.model_type = 'sdxl'")
    if config is not None and is_local_path(config):
        config = Path(config).expanduser()
        if not config.exists():
            raise FileNotFoundError(
                f"{config}: no such config folder (for {path}); give a diffusers SD 1.5 folder or hub id")
        check_diffusers_sd15_folder(config)
    config_arg = None if config is None else str(config)
    single_kwargs = _hub_kwargs(None, local_files_only) | {"safety_checker": None, "requires_safety_checker": False}
    return single_file_pipeline(StableDiffusionPipeline, str(path), config_arg, spec, single_kwargs)


def load_pipeline(
    base_model: str | Path,
    family: str = "auto",
    *,
    config: str | Path | None = None,
    dtype: DtypeSpec = None,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StableDiffusionXLPipeline | StableDiffusionPipeline:
    """`load_sdxl_pipeline` or `load_sd15_pipeline`, as `family` says ("auto": detected from the base model)."""
    loaders = {"sdxl": load_sdxl_pipeline, "sd15": load_sd15_pipeline}
    resolved = resolve_family(family, base_model, config)
    return loaders[resolved](base_model, config=config, dtype=torch_dtype if dtype is None else dtype,
                             local_files_only=local_files_only)


def load_clipseg(
    model_id_or_path: str | Path, *, local_files_only: bool | None = None
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """CLIPSeg model (in eval mode) and its processor from a folder or hub id."""
    name = str(model_id_or_path)
    if is_local_path(model_id_or_path):
        name = str(Path(model_id_or_path).expanduser())
        if not Path(name).is_dir():
            raise FileNotFoundError(f"{name}: no such CLIPSeg folder; give a folder or a hub id (CIDAS/clipseg-rd64-refined)")
    kwargs = _hub_kwargs(None, local_files_only)
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(name, **kwargs).eval()
        return model, CLIPSegProcessor.from_pretrained(name, **kwargs)
    except OSError as error:  # not cached while offline, no such repo, an incomplete folder, ...
        raise OSError(f"{name}: could not load CLIPSeg: {error}") from error


def _model_name(model_id_or_path: str | Path, what: str, example: str) -> str:
    """The name to hand `from_pretrained`: an existing folder or a hub id (FileNotFoundError otherwise)."""
    if not is_local_path(model_id_or_path):
        return str(model_id_or_path)
    name = str(Path(model_id_or_path).expanduser())
    if not Path(name).is_dir():
        raise FileNotFoundError(f"{name}: no such {what} folder; give a folder or a hub id ({example})")
    return name


def load_dino(model_id_or_path: str | Path, *, local_files_only: bool | None = None) -> tuple[ViTModel, Any]:
    """A DINO ViT (eval mode, no pooler: the CLS token is the embedding) and its image processor."""
    name = _model_name(model_id_or_path, "DINO", "facebook/dino-vits16")
    kwargs = _hub_kwargs(None, local_files_only)
    try:
        model = ViTModel.from_pretrained(name, add_pooling_layer=False, **kwargs).eval()
        return model, AutoImageProcessor.from_pretrained(name, **kwargs)
    except OSError as error:
        raise OSError(f"{name}: could not load DINO: {error}") from error


def load_clip(model_id_or_path: str | Path, *, local_files_only: bool | None = None) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP model (eval mode, image and text towers) and its processor (image processor + tokenizer)."""
    name = _model_name(model_id_or_path, "CLIP", "openai/clip-vit-large-patch14")
    kwargs = _hub_kwargs(None, local_files_only)
    try:
        model = CLIPModel.from_pretrained(name, **kwargs).eval()
        return model, CLIPProcessor.from_pretrained(name, **kwargs)
    except OSError as error:
        raise OSError(f"{name}: could not load CLIP: {error}") from error
