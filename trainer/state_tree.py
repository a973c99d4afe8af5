"""Nested training state (optimizer, LR scheduler, sampler, EMA, RNG states) as JSON + safetensors:
written and read without pickle, so a backup from a shared workspace can never run code.

Dicts, lists, tuples, numbers, strings, None, torch tensors and numpy arrays round-trip exactly
(tuples stay tuples, int keys stay ints, bf16 stays bf16); tensors go to the safetensors file and
the JSON holds references to them. Anything else is refused when writing.

    write_state(folder / "objects", {"optimizer": opt.state_dict(), "rng": capture_rng()})
    state = read_state(folder / "objects")      # objects.json + objects.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
MARKERS = (TENSOR, ARRAY, TUPLE, ITEMS)


class StateFileError(ValueError):
    """A state file that is not what `write_state` writes (damaged, or not ours)."""


def write_state(stem: Path, state: Any) -> list[Path]:
    """Write `state` to `<stem>.json` and `<stem>.safetensors`; returns both paths."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    save_file(tensors, tensor_path)
    json_path.write_text(json.dumps(tree))
    return [json_path, tensor_path]


def read_state(stem: Path) -> Any:
    """Read what `write_state(stem, ...)` wrote (tensors on the CPU)."""
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        tensors = load_file(tensor_path)
        tree = json.loads(json_path.read_text())
        return _decode(tree, tensors)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise StateFileError(f"{json_path} / {tensor_path.name}: not a readable training state ({error}); "
                             "delete this backup folder to start from the one before it") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        return {TENSOR: _store(value.detach().cpu(), tensors)}
    if isinstance(value, np.ndarray):
        return {ARRAY: _store(torch.from_numpy(np.array(value)), tensors)}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in MARKERS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a backup (tensors and plain data only)")


def _store(tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> str:
    key = str(len(tensors))
    tensors[key] = tensor.contiguous().clone()  # own storage: safetensors refuses shared memory
    return key


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if ARRAY in value:
        return tensors[value[ARRAY]].numpy()
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}
