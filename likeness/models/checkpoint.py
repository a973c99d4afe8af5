"""Checkpoint export: an SDXL pipeline as ONE `.safetensors` file in the layout AUTOMATIC1111 and
ComfyUI load (the "original" Stability layout), or as a diffusers folder.

The key mapping is the exact inverse of diffusers' single-file loader
(`diffusers.loaders.single_file_utils`), derived from each model's config (layers per block,
number of levels, which up blocks have attention), so it holds for the tiny test model and the
real SDXL alike. Layout of the file:

    model.diffusion_model.*                       UNet
    first_stage_model.*                           VAE
    conditioner.embedders.0.transformer.text_model.*   text encoder 1 (Hugging Face CLIP keys)
    conditioner.embedders.1.model.*               text encoder 2 (OpenCLIP keys: q/k/v stacked,
                                                  text_projection stored transposed)

Small string metadata rides along (base model, epoch, step, settings hash, likeness version,
`modelspec.architecture`); `load_checkpoint_metadata` reads it back. Every file is written
atomically: a killed save never leaves a file under the final name.

    python -m likeness.models.checkpoint DIFFUSERS_FOLDER OUT.safetensors [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from likeness.files import atomic_path, temporary_folder
from likeness.models.checkpoint_info import (  # noqa: F401  (re-exported)
    ARCHITECTURE, FOLDER_METADATA, CheckpointInfo, likeness_version, load_checkpoint_metadata,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
TE2_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
TE2_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


class Rule(NamedTuple):
    """Where a diffusers module prefix goes: its original prefix, renames of the modules below it,
    and whether its linear weights are stored as 1x1 convolutions (the VAE's mid attention)."""

    prefix: str
    renames: Mapping[str, str] = {}
    conv1x1: bool = False


def output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a settings name ("bfloat16") or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"training.output_dtype: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_filename(prefix: str, epoch: int, fmt: str = "safetensors") -> str:
    """`<prefix>-<epoch>.safetensors`, or `<prefix>-<epoch>` for a diffusers folder."""
    return f"{prefix}-{epoch}.safetensors" if fmt == "safetensors" else f"{prefix}-{epoch}"


# --- key mapping ---------------------------------------------------------------------------


def _rename(key: str, rules: Mapping[str, Rule], what: str) -> tuple[str, Rule]:
    """Map one diffusers key through the rule of its longest matching module prefix."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        rule = rules.get(".".join(parts[:cut]) + ".")
        if rule is None:
            continue
        module, _, param = ".".join(parts[cut:]).rpartition(".")
        module = rule.renames.get(module, module)
        return rule.prefix + (f"{module}.{param}" if module else param), rule
    raise ValueError(f"{what}: parameter {key!r} has no place in the single-file SDXL layout "
                     "(not an SDXL-shaped model?); save it as a diffusers folder instead")


def unet_rules(config: Mapping[str, Any]) -> dict[str, Rule]:
    """Diffusers UNet module prefix -> original (`input_blocks`/`middle_block`/`output_blocks`) prefix."""
    n, levels = config["layers_per_block"], len(config["block_out_channels"])
    if not isinstance(n, int):
        raise ValueError(f"unet config: layers_per_block must be one number for the single-file layout, got {n!r}")
    if "CrossAttn" not in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"unet config: mid_block_type {config.get('mid_block_type')!r} has no single-file layout")
    rules = {"time_embedding.linear_1.": Rule("time_embed.0."), "time_embedding.linear_2.": Rule("time_embed.2."),
             "add_embedding.linear_1.": Rule("label_emb.0.0."), "add_embedding.linear_2.": Rule("label_emb.0.2."),
             "conv_in.": Rule("input_blocks.0.0."), "conv_norm_out.": Rule("out.0."), "conv_out.": Rule("out.2."),
             "mid_block.resnets.0.": Rule("middle_block.0.", UNET_RESNET),
             "mid_block.attentions.0.": Rule("middle_block.1."),
             "mid_block.resnets.1.": Rule("middle_block.2.", UNET_RESNET)}
    for level in range(levels):
        for j in range(n):  # input block 0 is conv_in; each level has n layers + 1 downsampler
            block = 1 + level * (n + 1) + j
            rules[f"down_blocks.{level}.resnets.{j}."] = Rule(f"input_blocks.{block}.0.", UNET_RESNET)
            rules[f"down_blocks.{level}.attentions.{j}."] = Rule(f"input_blocks.{block}.1.")
        rules[f"down_blocks.{level}.downsamplers.0.conv."] = Rule(f"input_blocks.{(level + 1) * (n + 1)}.0.op.")
    for level, block_type in enumerate(config["up_block_types"]):
        for j in range(n + 1):  # up blocks have one layer more (the skip connections)
            block = level * (n + 1) + j
            rules[f"up_blocks.{level}.resnets.{j}."] = Rule(f"output_blocks.{block}.0.", UNET_RESNET)
            rules[f"up_blocks.{level}.attentions.{j}."] = Rule(f"output_blocks.{block}.1.")
        slot = 2 if "Attn" in block_type else 1  # the upsampler follows the attention, if any
        rules[f"up_blocks.{level}.upsamplers.0.conv."] = Rule(f"output_blocks.{level * (n + 1) + n}.{slot}.conv.")
    return rules


def vae_rules(config: Mapping[str, Any]) -> dict[str, Rule]:
    """Diffusers VAE module prefix -> original (`encoder.down`/`decoder.up`) prefix; decoder levels reversed."""
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    rules = {f"{p}.{name}.": Rule(f"{p}.{name}.") for p in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    rules |= {"quant_conv.": Rule("quant_conv."), "post_quant_conv.": Rule("post_quant_conv.")}
    for part in ("encoder", "decoder"):
        rules[f"{part}.conv_norm_out."] = Rule(f"{part}.norm_out.")
        rules[f"{part}.mid_block.resnets.0."] = Rule(f"{part}.mid.block_1.", VAE_RESNET)
        rules[f"{part}.mid_block.resnets.1."] = Rule(f"{part}.mid.block_2.", VAE_RESNET)
        rules[f"{part}.mid_block.attentions.0."] = Rule(f"{part}.mid.attn_1.", VAE_ATTENTION, conv1x1=True)
    for level in range(levels):
        up = levels - 1 - level
        for j in range(n + 1):
            rules[f"encoder.down_blocks.{level}.resnets.{j}."] = Rule(f"encoder.down.{level}.block.{j}.", VAE_RESNET)
            rules[f"decoder.up_blocks.{level}.resnets.{j}."] = Rule(f"decoder.up.{up}.block.{j}.", VAE_RESNET)
        rules[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = Rule(f"encoder.down.{level}.downsample.conv.")
        rules[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = Rule(f"decoder.up.{up}.upsample.conv.")
    return rules


def _convert(state_dict: Mapping[str, torch.Tensor], rules: Mapping[str, Rule], prefix: str,
             what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        name, rule = _rename(key, rules, what)
        if rule.conv1x1 and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[prefix + name] = tensor
    return out


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return _convert(state_dict, unet_rules(config), UNET_PREFIX, "unet")


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return _convert(state_dict, vae_rules(config), VAE_PREFIX, "vae")


def clip_l_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder 1 keeps Hugging Face keys under `text_model.` (transformers 5 saves them without it)."""
    return {TE1_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder 2 (CLIPTextModelWithProjection) in OpenCLIP's layout."""
    plain = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in plain.items():
        if key == "text_projection.weight":
            out[TE2_PREFIX + "text_projection"] = tensor.T  # (P, W) -> (W, P): OpenCLIP multiplies x @ proj
        elif key in TE2_TOP:
            out[TE2_PREFIX + TE2_TOP[key]] = tensor
        elif key.startswith("encoder.layers."):
            _open_clip_layer(key, plain, out)
        else:
            raise ValueError(f"text_encoder_2: parameter {key!r} has no place in the OpenCLIP layout")
    return out


def _open_clip_layer(key: str, plain: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
    module, _, param = rest.rpartition(".")
    target = f"{TE2_PREFIX}transformer.resblocks.{layer}."
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        if module == "self_attn.q_proj":  # stacked once, when q comes by: (3W, W) and (3W,)
            parts = [plain[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{target}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
        return
    if module not in TE2_LAYER:
        raise ValueError(f"text_encoder_2: parameter {key!r} has no place in the OpenCLIP layout")
    out[f"{target}{TE2_LAYER[module]}.{param}"] = plain[key]


def sdxl_original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                             text_encoder_2: torch.nn.Module, dtype: str | torch.dtype = torch.float32,
                             ) -> dict[str, torch.Tensor]:
    """Every weight of the four models under its single-file key: on the CPU, in `dtype`, contiguous.

    Pass the plain modules (unwrapped from DDP / torch.compile).
    """
    target = output_dtype(dtype)
    parts = [unet_to_original(unet.state_dict(), unet.config), vae_to_original(vae.state_dict(), vae.config),
             clip_l_to_original(text_encoder.state_dict()), open_clip_to_original(text_encoder_2.state_dict())]
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return {k: _cast(v, target) for k, v in merged.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(device="cpu", dtype=dtype)
    return tensor.to("cpu").contiguous()


# --- writing and reading ---------------------------------------------------------------------


def save_single_file(pipe: Any, path: str | Path, info: CheckpointInfo, dtype: str | torch.dtype = "bfloat16") -> Path:
    """Write `pipe`'s unet, vae, text_encoder and text_encoder_2 as one single-file checkpoint, atomically.

    `pipe` is a StableDiffusionXLPipeline or anything with those four attributes.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint must end in .safetensors")
    tensors = sdxl_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, dtype)
    info = _with_dtype(info, dtype)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info.metadata())
    return path


def save_diffusers_folder(pipe: Any, folder: str | Path, info: CheckpointInfo,
                          dtype: str | torch.dtype = "bfloat16") -> Path:
    """`pipe.save_pretrained` into a temporary sibling, weights cast to `dtype`, then renamed to `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(folder)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _cast_weight_files(tmp, output_dtype(dtype))
        (tmp / FOLDER_METADATA).write_text(json.dumps(_with_dtype(info, dtype).metadata(), indent=2) + "\n")
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_checkpoint(pipe: Any, path: str | Path, info: CheckpointInfo, dtype: str | torch.dtype = "bfloat16",
                    fmt: str = "safetensors") -> Path:
    """Save as settings.saving.format says: "safetensors" (one file) or "diffusers" (a folder)."""
    savers: dict[str, Callable[..., Path]] = {"safetensors": save_single_file, "diffusers": save_diffusers_folder}
    if fmt not in savers:
        raise ValueError(f"saving.format: unknown format {fmt!r}; use 'safetensors' or 'diffusers'")
    return savers[fmt](pipe, path, info, dtype)


def _with_dtype(info: CheckpointInfo, dtype: str | torch.dtype) -> CheckpointInfo:
    name = str(output_dtype(dtype)).removeprefix("torch.")
    return CheckpointInfo(info.base_model, info.epoch, info.step, info.settings_hash, name, info.version,
                          info.architecture)


def _cast_weight_files(folder: Path, dtype: torch.dtype) -> None:
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            file_metadata = f.metadata()
        tensors = {k: _cast(v, dtype) for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata=file_metadata)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    from likeness.models.loading import load_sdxl_pipeline

    parser = argparse.ArgumentParser(description="Convert an SDXL model to one A1111/ComfyUI .safetensors file.")
    parser.add_argument("model", help="diffusers folder, hub id or single-file checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    pipe = load_sdxl_pipeline(args.model, dtype=DTYPES[args.dtype])  # made in the output dtype: no fp32 copy
    save_single_file(pipe, args.out, CheckpointInfo(base_model=args.model, epoch=0, step=0), args.dtype)
    print(args.out)


if __name__ == "__main__":
    main()
