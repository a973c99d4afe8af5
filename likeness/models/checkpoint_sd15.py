"""Checkpoint export for SD 1.5: a StableDiffusionPipeline as ONE `.safetensors` file in the
original (CompVis / A1111 / ComfyUI) layout, and `save_any_checkpoint`, which picks the SDXL or
SD 1.5 writer from the pipeline.

Layout of the file (the UNet and VAE rename rules are the SDXL ones of `likeness/models/checkpoint.py`,
derived from each model's config; SD 1.5 has no `add_embedding`, so no `label_emb`):

    model.diffusion_model.*                 UNet
    first_stage_model.*                     VAE
    cond_stage_model.transformer.text_model.*   the text encoder (Hugging Face CLIP keys)

    python -m likeness.models.checkpoint_sd15 DIFFUSERS_FOLDER OUT.safetensors [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from likeness.files import atomic_path
from likeness.models.checkpoint import (
    DTYPES,
    TE1_PREFIX,
    CheckpointInfo,
    _cast,
    _with_dtype,
    clip_l_to_original,
    output_dtype,
    save_checkpoint,
    unet_to_original,
    vae_to_original,
)

ARCHITECTURE_SD15 = "stable-diffusion-v1"
SD15_TE_PREFIX = "cond_stage_model.transformer."


def sd15_text_encoder_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP text encoder under `cond_stage_model.transformer.text_model.*` (HF keys, as SD 1.5 ships)."""
    return {SD15_TE_PREFIX + k.removeprefix(TE1_PREFIX): v for k, v in clip_l_to_original(state_dict).items()}


def sd15_original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                             dtype: str | torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight of the three models under its SD 1.5 single-file key: on the CPU, in `dtype`, contiguous.

    Pass the plain modules (unwrapped from DDP / torch.compile).
    """
    if getattr(unet.config, "addition_embed_type", None):
        raise ValueError(f"unet: addition_embed_type {unet.config.addition_embed_type!r} is an SDXL-style UNet; "
                         "save it with the SDXL layout (likeness.models.checkpoint.save_single_file)")
    target = output_dtype(dtype)
    merged = unet_to_original(unet.state_dict(), unet.config)
    merged |= vae_to_original(vae.state_dict(), vae.config)
    merged |= sd15_text_encoder_to_original(text_encoder.state_dict())
    return {k: _cast(v, target) for k, v in merged.items()}


def save_single_file_sd15(pipe: Any, path: str | Path, info: CheckpointInfo,
                          dtype: str | torch.dtype = "bfloat16") -> Path:
    """Write `pipe`'s unet, vae and text_encoder as one SD 1.5 single-file checkpoint, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint must end in .safetensors")
    tensors = sd15_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, dtype)
    info = _with_dtype(info, dtype)
    if info.architecture != ARCHITECTURE_SD15:
        info = CheckpointInfo(info.base_model, info.epoch, info.step, info.settings_hash, info.dtype, info.version,
                              ARCHITECTURE_SD15)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info.metadata())
    return path


def is_sd15_pipeline(pipe: Any) -> bool:
    """SD 1.5-shaped: one text encoder, and a UNet without SDXL's addition embeddings."""
    return getattr(pipe, "text_encoder_2", None) is None and not getattr(pipe.unet.config, "addition_embed_type", None)


def save_any_checkpoint(pipe: Any, path: str | Path, info: CheckpointInfo, dtype: str | torch.dtype = "bfloat16",
                        fmt: str = "safetensors") -> Path:
    """`checkpoint.save_checkpoint` for SDXL and SD 1.5 alike: the single-file layout follows the pipeline."""
    if fmt == "safetensors" and is_sd15_pipeline(pipe):
        return save_single_file_sd15(pipe, path, info, dtype)
    return save_checkpoint(pipe, path, info, dtype, fmt)


def main(argv: list[str] | None = None) -> None:
    from likeness.models.loading import load_pipeline

    parser = argparse.ArgumentParser(
        description="Convert an SD 1.5 or SDXL model to one A1111/ComfyUI .safetensors file.")
    parser.add_argument("model", help="diffusers folder, hub id or single-file checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype])  # made in the output dtype: no fp32 copy
    save_any_checkpoint(pipe, args.out, CheckpointInfo(base_model=args.model, epoch=0, step=0), args.dtype)
    print(args.out)


if __name__ == "__main__":
    main()
