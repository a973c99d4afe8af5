"""LoRA files in the layout kohya's sd-scripts write and AUTOMATIC1111/Forge, ComfyUI and diffusers'
`load_lora_weights` read, for the SDXL UNet and text encoder 1.

One module of the model is one LoRA *name*: the module's weight key in the single-file
(original Stability) layout, prefix swapped and dots turned into underscores:

    model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight
        -> lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight
        -> lora_te1_text_model_encoder_layers_0_mlp_fc1

and carries three tensors: `<name>.lora_down.weight` (rank, in) — for a convolution
(rank, in, kh, kw) —, `<name>.lora_up.weight` (out, rank) — for a convolution (out, rank, 1, 1) —
and `<name>.alpha` (a scalar). The merged weight is W + (alpha / rank) * up @ down.

The trainer (`training.method = "lora"`, peft adapters) and the extraction (`lora_extract.py`)
both write through `save_lora_file`; evaluation loads a LoRA checkpoint as base + LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from likeness.files import atomic_path
from likeness.models.checkpoint import ARCHITECTURE, TE1_PREFIX, UNET_PREFIX, clip_l_to_original, unet_to_original

UNET_LORA = "lora_unet_"
TE1_LORA = "lora_te1_"
TE1_LAYERS = TE1_PREFIX + "text_model.encoder.layers."  # the only text-encoder modules LoRA loaders map
LORA_ARCHITECTURE = ARCHITECTURE + "/lora"
KIND_KEY = "likeness.kind"  # "lora" in the metadata of every file written here

# OneTrainer's `lora_layer_preset` names -> substrings of the diffusers UNet module names they train
# (an empty list: every linear and convolution layer).
LAYER_PRESETS: dict[str, list[str]] = {"attn-only": ["attn"], "attn-mlp": ["attentions"], "full": []}


def lora_name(original_key: str) -> str | None:
    """The kohya LoRA name of an original-layout weight key; None for weights no LoRA loader maps."""
    if not original_key.endswith(".weight"):
        return None
    if original_key.startswith(UNET_PREFIX):
        prefix, body = UNET_LORA, original_key[len(UNET_PREFIX):]
    elif original_key.startswith(TE1_LAYERS):
        prefix, body = TE1_LORA, original_key[len(TE1_PREFIX):]
    else:
        return None
    return prefix + body.removesuffix(".weight").replace(".", "_")


def unet_lora_names(module_names: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module name -> kohya LoRA name (through the single-file key mapping)."""
    keys = {f"{name}.weight": name for name in module_names}
    # The mapping only renames keys: it is given the module names in place of tensors.
    original = unet_to_original(keys, config)  # type: ignore[arg-type]
    return {module: lora_name(key) or "" for key, module in original.items()}


def te1_lora_names(module_names: Iterable[str]) -> dict[str, str]:
    """Text encoder 1 (Hugging Face CLIP) module name -> kohya LoRA name."""
    keys = {f"{name}.weight": name for name in module_names}
    original = clip_l_to_original(keys)  # type: ignore[arg-type]
    return {module: lora_name(key) or "" for key, module in original.items()}


def lora_tensors(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The three tensors of one LoRA module, on the CPU in `dtype` (alpha stays float32)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype).contiguous()
    return {f"{name}.lora_down.weight": cast(down), f"{name}.lora_up.weight": cast(up),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def lora_metadata(*, rank: int, alpha: float, base_model: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """safetensors metadata: kohya's `ss_*` keys clients show, modelspec, and ours (`likeness.*`)."""
    meta = {"format": "pt", "modelspec.architecture": LORA_ARCHITECTURE, "modelspec.implementation": "sgm",
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": Path(str(base_model)).name,
            KIND_KEY: "lora", "likeness.rank": str(rank), "likeness.alpha": str(float(alpha)),
            "likeness.base_model": str(base_model)}
    return meta | dict(extra or {})


def save_lora_file(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write one LoRA .safetensors atomically (a killed save leaves no file under the final name)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file must end in .safetensors")
    check_lora_keys(tensors, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))
    return path


def check_lora_keys(tensors: Mapping[str, Any], where: str) -> None:
    """Every key is `<lora name>.lora_down.weight|.lora_up.weight|.alpha`, all three present."""
    names: dict[str, set[str]] = {}
    for key in tensors:
        name, dot, suffix = key.partition(".")
        if not dot or not name.startswith((UNET_LORA, TE1_LORA)) or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{where}: {key!r} is not a kohya LoRA key")
        names.setdefault(name, set()).add(suffix)
    incomplete = sorted(n for n, parts in names.items() if len(parts) != 3)
    if incomplete:
        raise ValueError(f"{where}: LoRA modules without down, up and alpha: {', '.join(incomplete[:5])}")


def is_lora_file(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file this module wrote (or any kohya-layout LoRA file)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get(KIND_KEY) == "lora":
            return True
        return any(k.startswith((UNET_LORA, TE1_LORA)) for k in f.keys())


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def apply_lora(pipe: Any, path: str | Path, scale: float = 1.0) -> Any:
    """Merge a LoRA file into `pipe`'s weights with diffusers' own loader (`load_lora_weights`, then
    `fuse_lora`), so the pipeline runs at full speed with no adapters left; returns `pipe`."""
    pipe.load_lora_weights(str(path), adapter_name="likeness")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["likeness"])
    pipe.unload_lora_weights()  # the fused weights stay; the adapter modules go
    return pipe
