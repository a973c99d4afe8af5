"""Loading every part of a pipeline directly in its own weight dtype, from a folder, a hub id or one file.

A model loaded in fp32 and cast afterwards needs twice the memory of a bf16 one at the moment of
the cast (full-size SDXL: 14 GB instead of 7). So the dtype goes to the loader itself: diffusers
creates each model on the meta device and writes every tensor straight in the dtype asked for.

A dtype spec is one `torch.dtype` for every part, or a mapping part -> dtype with an optional
"default" for the parts it does not name (as diffusers' `from_pretrained(dtype={...})` takes it):

    spec = {"unet": torch.bfloat16, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16,
            "vae": torch.float32}
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, **dtype_kwargs(spec))
    pipe = single_file_pipeline(StableDiffusionXLPipeline, "model.safetensors", "config-folder", spec, {})

diffusers' `from_single_file` takes one dtype only, so a file is read once per distinct dtype: the
parts in the UNet's dtype come with the pipeline, the others are loaded beforehand (the UNet and
the VAE by their own `from_single_file`, text encoders by a pipeline load of those encoders alone)
and handed to it. Checkpoint files are memory-mapped, so a second read costs little memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

DtypeSpec = torch.dtype | Mapping[str, torch.dtype] | None
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_OWN_LOADER = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}


def dtype_of(spec: DtypeSpec, part: str) -> torch.dtype | None:
    """The dtype `spec` gives `part` (None: the library's default, float32)."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    return spec.get(part, spec.get("default"))


def dtype_kwargs(spec: DtypeSpec) -> dict[str, Any]:
    """`from_pretrained` keyword for `spec`: `dtype` (diffusers 0.36+ deprecates `torch_dtype`); none for None."""
    if spec is None:
        return {}
    if isinstance(spec, torch.dtype):
        return {"dtype": spec}
    return {"dtype": {"default": torch.float32, **spec}}


def single_file_pipeline(pipeline_class: Any, path: str, config: str | None, spec: DtypeSpec,
                         kwargs: Mapping[str, Any]) -> Any:
    """`pipeline_class.from_single_file(path, config=config, **kwargs)` with each part in its dtype of `spec`."""
    parts = [p for p in MODEL_PARTS if p in pipeline_class._get_signature_keys(pipeline_class)[0]]
    main = dtype_of(spec, "unet")
    others = {p: dtype_of(spec, p) for p in parts if dtype_of(spec, p) != main}
    loaded: dict[str, Any] = {}
    for part, dtype in others.items():
        if part in _OWN_LOADER:
            loaded[part] = _OWN_LOADER[part].from_single_file(path, config=config, subfolder=part, dtype=dtype,
                                                              **kwargs)
    for dtype in {d for p, d in others.items() if p not in _OWN_LOADER}:
        encoders = [p for p, d in others.items() if d == dtype and p not in _OWN_LOADER]
        skipped = {p: None for p in parts if p not in encoders}
        alone = pipeline_class.from_single_file(path, config=config, dtype=dtype, **skipped, **kwargs)
        loaded.update({p: getattr(alone, p) for p in encoders})
        del alone
    return pipeline_class.from_single_file(path, config=config, dtype=main, **loaded, **kwargs)
