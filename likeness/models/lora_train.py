"""LoRA training with peft: adapters on the SDXL UNet (and text encoder 1), and their weights in
the kohya/A1111/ComfyUI file layout of `likeness.models.lora`.

Which layers get an adapter follows OneTrainer's `lora_layer_preset`: `attn-only` (the attention
projections to_q/k/v/out), `attn-mlp` (everything inside the transformer blocks: attention,
feed-forward, proj_in/out; OneTrainer's default) or `full` (every linear and convolution layer);
`layers` replaces the preset by your own substrings of the diffusers module names. Text encoder 1,
when trained, gets adapters on all its linear layers (as OneTrainer does). peft's scaling
alpha / rank is the same as kohya's, so a trained adapter is saved as it is.

    add_lora_adapters(pipe, ["unet", "text_encoder"], settings.training.lora)
    tensors = lora_state_dict(pipe, ["unet", "text_encoder"], torch.bfloat16)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from likeness.models.checkpoint import CheckpointInfo, output_dtype
from likeness.models.lora import (
    LAYER_PRESETS, lora_metadata, lora_tensors, save_lora_file, te1_lora_names, unet_lora_names,
)

ADAPTER = "default"
LORA_PARTS = ("unet", "text_encoder")


def lora_target_modules(module: torch.nn.Module, filters: Sequence[str]) -> list[str]:
    """Names of the linear and convolution layers of `module` whose name contains one of `filters`
    (all of them when `filters` is empty)."""
    return [name for name, child in module.named_modules()
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and (not filters or any(f in name for f in filters))]


def layer_filters(preset: str, layers: Sequence[str] | None) -> list[str]:
    if layers:
        return list(layers)
    if preset not in LAYER_PRESETS:
        raise ValueError(f"training.lora.layer_preset: unknown preset {preset!r}; use one of {', '.join(LAYER_PRESETS)}")
    return LAYER_PRESETS[preset]


def add_lora_adapters(pipe: Any, parts: Iterable[str], lora: Any, seed: int = 0) -> dict[str, int]:
    """Freeze each part of `parts` and give it LoRA adapters (peft) as `lora` (training.lora) says.

    The adapters' random init (peft: Kaiming-uniform A, zero B) comes from `seed` (run.seed), not
    from whatever state torch's global generator is in, so a run is reproducible and its resume
    from a backup continues the same run. Returns the number of adapted layers per part. Only the
    adapters require gradients afterwards.
    """
    with torch.random.fork_rng(devices=[]):  # peft creates the adapters on the CPU, then moves them
        torch.random.default_generator.manual_seed(seed)
        return _add_adapters(pipe, parts, lora)


def _add_adapters(pipe: Any, parts: Iterable[str], lora: Any) -> dict[str, int]:
    counts = {}
    for part in parts:
        if part not in LORA_PARTS:
            raise ValueError(f"training.method = 'lora': {part} cannot train a LoRA (only the UNet and text encoder 1)")
        module = getattr(pipe, part)
        filters = layer_filters(lora.layer_preset, lora.layers) if part == "unet" else []
        targets = lora_target_modules(module, filters)
        if not targets:
            raise ValueError(f"training.lora.layers {filters}: no linear or convolution layer of the {part} matches")
        module.requires_grad_(False)
        pattern = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"  # whole names, never suffixes
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                            init_lora_weights=True)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        dtype = getattr(torch, lora.weight_dtype)
        for layer in _lora_layers(module).values():
            for adapter in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                adapter.to(dtype).requires_grad_(True)
        counts[part] = len(targets)
    return counts


def _lora_layers(module: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: child for name, child in module.named_modules() if isinstance(child, LoraLayer)}


def lora_state_dict(pipe: Any, parts: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapters of `parts` under their kohya names (lora_down = peft's A, lora_up = B)."""
    tensors: dict[str, torch.Tensor] = {}
    for part in parts:
        module = getattr(pipe, part)
        layers = _lora_layers(module)
        names = unet_lora_names(layers, module.config) if part == "unet" else te1_lora_names(layers)
        for module_name, layer in layers.items():
            name = names[module_name]
            if not name:
                raise ValueError(f"{part}.{module_name}: no LoRA name in the single-file layout")
            tensors |= lora_tensors(name, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                    layer.lora_alpha[ADAPTER], dtype)
    return tensors


def adapter_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors of one part, by parameter name (for backups)."""
    return {name: p.detach() for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def load_adapter_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """Put backed-up adapter tensors back; every adapter must be there, nothing else."""
    expected = set(adapter_weights(module))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{where}: the backup's LoRA adapters do not match this run's "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); delete the backup or change the settings back")
    module.load_state_dict(dict(weights), strict=False)


def save_lora_checkpoint(pipe: Any, parts: Iterable[str], path: str | Path, info: CheckpointInfo,
                         rank: int, alpha: float, dtype: str | torch.dtype = "bfloat16") -> Path:
    """A trained LoRA as ONE kohya-layout .safetensors file, with the checkpoint's metadata (epoch, step, ...)."""
    tensors = lora_state_dict(pipe, parts, output_dtype(dtype))
    name = str(output_dtype(dtype)).removeprefix("torch.")
    extra = {k: v for k, v in info.metadata().items() if k.startswith("likeness.")} | {"likeness.dtype": name}
    return save_lora_file(tensors, path, lora_metadata(rank=rank, alpha=alpha, base_model=info.base_model, extra=extra))
