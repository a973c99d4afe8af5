"""Extract a LoRA from a fine-tuned SDXL checkpoint: the difference of every linear and convolution
weight of the UNet and text encoder 1 to the base model's, reduced per layer to rank R.

Per layer (as kohya's `extract_lora_from_models.py` shapes it): a linear or 1x1 convolution
difference is a matrix (out, in); a k x k convolution's is flattened to (out, in * k * k), and its
factors become `lora_down` (R, in, k, k) and `lora_up` (out, R, 1, 1). The best rank-R approximation
(Eckart-Young) is the projection onto the top R singular vectors. Where R is small beside the layer
(R + max(8, R/4) at most a quarter of its smaller side: rank 8-128 on SDXL's 640-2048-wide layers) a
seeded randomized range finder with four power iterations finds them (`low_rank(method="randomized")`),
several times faster than the exact way, with a relative error within 1 % of the optimum's on the
bench's spectra (bench/lora_bench.py --accuracy prints both); elsewhere, and at full rank, the
exact way: the eigenvectors of the smaller side's Gram matrix (float64), itself many times faster
than a full SVD of a (1280, 11520) convolution on a CPU. alpha = rank per layer (scale 1), as kohya
records it. Unlike kohya, nothing is clamped: at full rank base + LoRA equals the checkpoint.

Weights are read one tensor at a time from the safetensors files (single file or diffusers folder),
so the peak memory is a few layers, not two models. The maths runs on the CPU with torch's threads;
on a machine shared with other work, `torch.set_num_threads(1)` (or OMP_NUM_THREADS=1) can be many
times faster than threads that spin waiting for each other.

    likeness extract-lora CHECKPOINT --base BASE -o person-lora.safetensors --rank 32
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from likeness.content import file_digest
from likeness.models.checkpoint import DTYPES, TE1_PREFIX, UNET_PREFIX, clip_l_to_original, unet_to_original
from likeness.models.loading import is_hub_id
from likeness.models.lora import lora_metadata, lora_name, lora_tensors, save_lora_file

PARTS = {"unet": "UNet", "te1": "text encoder 1"}


class WeightFiles:
    """Original-layout (single-file) UNet and text encoder 1 weights of a model, read lazily.

    `model` is a single-file checkpoint (.safetensors) or a diffusers folder (unet/ and
    text_encoder/, sharded or not).
    """

    def __init__(self, model: str | Path) -> None:
        self.model = Path(model)
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}  # original key -> (open file, key in that file)
        if self.model.is_file():
            self._add_single_file(self.model)
        elif self.model.is_dir():
            self._add_folder(self.model)
        elif is_hub_id(str(model)):
            self._add_folder(_hub_folder(str(model)))
        else:
            raise ValueError(f"{model}: no such checkpoint file, diffusers folder or hub id")

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, path: Path) -> Any:
        try:
            return self._stack.enter_context(safe_open(str(path), framework="pt"))
        except Exception as error:  # safetensors raises its own types
            raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error

    def _add_single_file(self, path: Path) -> None:
        handle = self._open(path)
        for key in handle.keys():
            if key.startswith((UNET_PREFIX, TE1_PREFIX)):
                self._where[key] = (handle, key)
        if not any(k.startswith(UNET_PREFIX) for k in self._where):
            raise ValueError(f"{path}: no UNet weights ({UNET_PREFIX}*); not an SDXL single-file checkpoint")

    def _add_folder(self, folder: Path) -> None:
        unet_config = _read_json(folder / "unet" / "config.json")
        unet_files = _weight_files(folder / "unet")
        te_files = _weight_files(folder / "text_encoder")
        for files, rename in ((unet_files, lambda keys: unet_to_original(keys, unet_config)),
                              (te_files, clip_l_to_original)):
            for path in files:
                handle = self._open(path)
                keys = {k: k for k in handle.keys()}
                for original, stored in rename(keys).items():  # renames keys only: names in, names out
                    self._where[original] = (handle, stored)

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        handle, stored = self._where[key]
        return handle.get_tensor(stored)


def _hub_folder(repo_id: str) -> Path:
    """The UNet and text encoder 1 of a hub model (downloaded once, then from the Hugging Face cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["unet/*", "text_encoder/*", "model_index.json"]))
    except Exception as error:  # offline, unknown repository, no access: the hub's own message says which
        raise ValueError(f"{repo_id}: cannot fetch its unet/ and text_encoder/ from the hub ({error})") from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: missing or unreadable ({error}); not a diffusers SDXL folder") from error


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one diffusers component (the non-variant ones when there are both)."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    files = files or sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights (convert .bin weights with save_pretrained first)")
    return files


# --- the maths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFactors:
    """One layer's rank-r factors: diff ~ up @ down, with the squared norms of diff and residual."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    diff_sq: float
    residual_sq: float


OVERSAMPLE = 8  # at least this many extra random directions (Halko et al. 2011, section 4.2), and rank / 4
POWER_ITERATIONS = 4  # subspace iterations: with rank / 4 oversampling, within 1 % of the optimum (bench/lora_bench.py)


def _sketch_size(r: int) -> int:
    return r + max(OVERSAMPLE, r // 4)


def low_rank(diff: torch.Tensor, rank: int, method: str = "auto") -> LayerFactors:
    """The best rank-`rank` factors of one weight difference (linear or convolution).

    method "exact": the top singular vectors from the Gram matrix of the smaller side (Eckart-Young);
    "randomized": a seeded randomized range finder with power iterations (Halko, Martinsson, Tropp
    2011), many times faster when the rank is small beside the layer; "auto": randomized where
    the sketch (rank + oversampling) is at most a quarter of the smaller side, else exact (so full
    rank is exact).
    """
    conv = diff.ndim == 4
    matrix = diff.reshape(diff.shape[0], -1).to(torch.float32)  # (out, in * kh * kw)
    out_dim, in_dim = matrix.shape
    r = min(rank, out_dim, in_dim)
    if method == "auto":
        method = "randomized" if 4 * _sketch_size(r) <= min(out_dim, in_dim) else "exact"
    if method == "randomized":
        up = _randomized_basis(matrix, r)  # (out, r) orthonormal
        down = up.T @ matrix  # (r, in): the projection onto that basis is the best factor for it
    elif method != "exact":
        raise ValueError(f"low_rank: unknown method {method!r}; use auto, exact or randomized")
    elif out_dim <= in_dim:  # left singular vectors: up = U_r, down = U_r^T M
        basis = _top_eigenvectors(matrix @ matrix.T, r)  # (out, r)
        up, down = basis, basis.T @ matrix
    else:  # right singular vectors: down = V_r^T, up = M V_r
        basis = _top_eigenvectors(matrix.T @ matrix, r)  # (in, r)
        up, down = matrix @ basis, basis.T
    residual = matrix - up @ down
    if conv:
        up = up.reshape(out_dim, r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    return LayerFactors(down.contiguous(), up.contiguous(), float(matrix.square().sum()), float(residual.square().sum()))


def _top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(gram.to(torch.float64))  # ascending eigenvalues
    return vectors[:, -r:].flip(-1).to(torch.float32).contiguous()


def _randomized_basis(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """An orthonormal (out, r) basis of the top-r column space of `matrix` (out, in), seeded so that
    an extraction gives the same file every time."""
    g = torch.Generator().manual_seed(0)
    sketch = torch.randn(matrix.shape[1], _sketch_size(r), generator=g)  # (in, q)
    q, _ = torch.linalg.qr(matrix @ sketch)  # (out, q)
    for _ in range(POWER_ITERATIONS):  # re-orthonormalized each way, or the float32 columns collapse
        q, _ = torch.linalg.qr(matrix.T @ q)  # (in, q)
        q, _ = torch.linalg.qr(matrix @ q)  # (out, q)
    small = (q.T @ matrix).to(torch.float64)  # (q, in)
    u, _, _ = torch.linalg.svd(small @ small.T)  # (q, q): the top directions inside the sketch
    return (q @ u[:, :r].to(torch.float32)).contiguous()


# --- one extraction ---------------------------------------------------------------------------


@dataclass
class PartReport:
    layers: int = 0
    unchanged: int = 0
    diff_sq: float = 0.0
    residual_sq: float = 0.0

    @property
    def relative_error(self) -> float:
        """||diff - LoRA||_F / ||diff||_F over the whole part (0 when nothing changed)."""
        return (self.residual_sq / self.diff_sq) ** 0.5 if self.diff_sq > 0 else 0.0


@dataclass
class ExtractionReport:
    path: Path
    rank: int
    bytes: int
    seconds: float
    parts: dict[str, PartReport] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"extract-lora: {self.path} (rank {self.rank}, {self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s)"]
        for part, r in self.parts.items():
            kept = r.layers - r.unchanged
            if kept == 0:
                lines.append(f"  {PARTS[part]}: unchanged from the base model, left out")
            else:
                lines.append(f"  {PARTS[part]}: {kept} layers, relative error {r.relative_error:.4f}"
                             + (f" ({r.unchanged} unchanged layers left out)" if r.unchanged else ""))
        return "\n".join(lines)

    def metadata(self) -> dict[str, str]:
        return {f"likeness.relative_error.{part}": f"{r.relative_error:.6g}" for part, r in self.parts.items()
                if r.layers > r.unchanged}


def extract_lora(checkpoint: str | Path, base: str | Path, out: str | Path, rank: int = 32,
                 dtype: str = "bfloat16", log: Callable[[str], None] | None = None,
                 method: str = "auto") -> ExtractionReport:
    """Extract the LoRA `checkpoint - base` at `rank` into ONE kohya-layout file `out`; see the module docstring."""
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    parts = {part: PartReport() for part in PARTS}
    tensors: dict[str, torch.Tensor] = {}
    with WeightFiles(checkpoint) as tuned, WeightFiles(base) as original:
        for name, tuned_weight, base_weight in _paired_layers(tuned, original, checkpoint, base):
            part = parts["unet" if name.startswith("lora_unet_") else "te1"]
            part.layers += 1
            if torch.equal(tuned_weight, base_weight.to(tuned_weight.dtype)):
                part.unchanged += 1  # not trained (or lost in the checkpoint's rounding): nothing to add
                continue
            factors = low_rank(tuned_weight.float() - base_weight.float(), rank, method)
            part.diff_sq += factors.diff_sq
            part.residual_sq += factors.residual_sq
            tensors |= lora_tensors(name, factors.down, factors.up, factors.down.shape[0], DTYPES[dtype])
    if not tensors:
        raise ValueError(f"{checkpoint}: every UNet and text encoder 1 weight equals the base model's; nothing to extract")
    report = ExtractionReport(Path(out), rank, 0, 0.0, parts)
    meta = lora_metadata(rank=rank, alpha=rank, base_model=str(base), extra={
        "likeness.source_checkpoint": str(checkpoint), "likeness.source_sha256": _digest(checkpoint),
        "likeness.base_model_sha256": _digest(base), "likeness.dtype": dtype, **report.metadata(),
        **_source_progress(checkpoint)})
    save_lora_file(tensors, out, meta)
    report.bytes, report.seconds = Path(out).stat().st_size, time.perf_counter() - started
    if log:
        log(report.summary())
    return report


def _paired_layers(tuned: WeightFiles, original: WeightFiles, checkpoint: str | Path,
                   base: str | Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(LoRA name, tuned weight, base weight) of every linear and convolution layer LoRA covers."""
    base_keys = set(original.keys())
    for key in tuned.keys():
        name = lora_name(key)
        if name is None:
            continue
        weight = tuned.get(key)
        if weight.ndim not in (2, 4):  # norms (1-D) have no LoRA; 2-D: linear, 4-D: convolution
            continue
        if key not in base_keys:
            raise ValueError(f"{base}: has no {key!r} that {checkpoint} has; not the base model of that checkpoint")
        base_weight = original.get(key)
        if base_weight.shape != weight.shape:
            raise ValueError(f"{key}: shape {tuple(weight.shape)} in {checkpoint}, {tuple(base_weight.shape)} in "
                             f"{base}; not the base model of that checkpoint")
        yield name, weight, base_weight


def _digest(model: str | Path) -> str:
    """sha256 of a single file; of a folder, the digest of its UNet and text encoder 1 weight files."""
    path = Path(model)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return f"hub:{model}"
    files = [*_weight_files(path / "unet"), *_weight_files(path / "text_encoder")]
    return "folder:" + ",".join(file_digest(p)[:16] for p in files)


def _source_progress(checkpoint: str | Path) -> dict[str, str]:
    """epoch and step of a likeness checkpoint (so selection can rank extracted LoRAs too)."""
    path = Path(checkpoint)
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: meta[k] for k in ("likeness.epoch", "likeness.step", "likeness.settings_hash") if k in meta}
