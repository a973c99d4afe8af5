"""Evaluation during training: score likeness while the run goes, and stop once it has peaked.

At the start (the base model's weights: the reference) and then every `every` epochs (0: at each
checkpoint save) the loop calls `InTrainingEvaluator.evaluate`: it generates the evaluation
prompts at a few fixed seeds with the current weights (the EMA weights when EMA is on), and
scores face identity against the training photos (`likeness/models/faces.py`) and prompt fidelity
(CLIP-T, `likeness/models/embeddings.py`). Each evaluation is a row of the history (kept in
backups, so a resumed run keeps it), written to `reports/evaluation.csv` and sent to the sinks as
`eval/...` scalars.

Early stop (`early_stop = true`): stop when face identity has not improved by `min_delta` over
the best so far for `patience` evaluations, or when prompt fidelity fell more than
`evaluation.selection.fidelity_tolerance` below the base model's.

The images are not made twice: when a checkpoint holds the weights an evaluation generated with
(saved at the same step; the EMA weights, as both use), `share` records them in the evaluate
stage's per-image cache under that checkpoint's key (`likeness/evaluation_images.py`), so the
grid reuses every (prompt, seed) the two have in common and generates only the rest. It shares
only where the grid would compute the same images (`grid_mismatch`): same weights, same dtype.

    evaluator = InTrainingEvaluator(settings, ws, device)
    row = evaluator.evaluate(pipe, step=120, epoch=3)
    evaluator.share("file:" + sha256_of_checkpoint, step=120)
    if evaluator.stop_reason(): ...
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from likeness.content import HashIndex
from likeness.evaluation_images import FROM_TRAINING, generate_images, generation_settings, image_key, record_image
from likeness.files import write_atomic
from likeness.latent_index import model_parts
from likeness.manifest import read_manifest
from likeness.models.embeddings import clip_text_embeddings, embed_images, load_embedder, mean_paired_similarity
from likeness.models.faces import load_face_models, open_photo, reference_embeddings, score_identity
from likeness.models.prompt_weights import plain_text
from likeness.models.sampling import save_sample
from likeness.settings import Settings
from likeness.workspace import Workspace

HISTORY_FILE = "evaluation.csv"
Row = dict[str, Any]


def subject_photos(ws: Workspace) -> list:
    """The subject's training photos (the originals where they still exist: larger faces than the prepared)."""
    df = read_manifest(ws.manifest, ws)
    rows = df[(df["role"] == "subject") & ~df["validation"].astype(bool)].sort_values("id").to_dict("records")
    return [open_photo(r["source_path"] if Path(r["source_path"]).is_file() else r["prepared_path"]) for r in rows]


def scalars(row: Row) -> dict[str, float]:
    """A history row as the sinks' `eval/...` scalars (unmeasured values left out)."""
    return {f"eval/{k}": float(v) for k, v in row.items() if k not in ("step", "epoch") and v is not None}


def grid_mismatch(settings: Settings, device: torch.device, checkpoint: bool = True) -> str | None:
    """Why the grid would not compute the in-training evaluation's images for the same weights (None: it would).

    The grid loads a checkpoint in float32 on a CPU (in training.train_dtype on a GPU) and generates
    without autocast; the evaluation holds each part in its weight_dtype under autocast(train_dtype).
    Equal when the compute dtypes match and saving (`checkpoint`; else loading the base model)
    kept the values the evaluation computed with. Under autocast the matrix products see the same
    values; the norms run in float32 there (train_dtype in the grid): the images agree to
    train_dtype's precision, the latitude the grid's cache already takes (its keys name no device
    or dtype). In float32 on a CPU the weights are the same bits and the images agree to 1/255 on a
    few pixels: the CPU's matrix products (MKL) sum in an order that depends on the weights' memory
    alignment, which differs between the trained tensors and the loaded checkpoint's (~1e-7 apart).
    """
    t = settings.training
    if checkpoint and t.method == "lora":  # (at the start the adapters are still zero: the base model's weights)
        return "LoRA: the grid merges the adapters into the weights, training adds them unmerged"
    grid = "float32" if device is None or torch.device(device).type == "cpu" else t.train_dtype
    if t.train_dtype != grid:
        return f"the grid generates in {grid} on {device}, the evaluation under autocast({t.train_dtype})"
    for part in ("vae", "unet", *model_parts(settings)):
        held = getattr(t, part).weight_dtype
        if t.train_dtype == "float32" and held != "float32":
            return f"training.{part}.weight_dtype {held}: the grid computes that part in float32"
        if checkpoint and not (held == t.output_dtype or t.output_dtype in ("float32", t.train_dtype)):
            return f"training.output_dtype {t.output_dtype} rounds training.{part}.weight_dtype {held}"
        if not checkpoint and held not in ("float32", t.train_dtype):
            return f"training.{part}.weight_dtype {held}: the grid loads the base model in {grid}"
    return None


class InTrainingEvaluator:
    """Generates and scores the evaluation prompts with the weights the loop holds; keeps the history."""

    def __init__(self, settings: Settings, ws: Workspace, device: torch.device,
                 history: Sequence[Row] | None = None) -> None:
        self.settings, self.ws, self.device = settings, ws, device
        self.during = settings.evaluation.during_training
        self.history: list[Row] = list(history or [])
        self.last: tuple[int, list[tuple[str, int]], list] | None = None  # (step, items, images) of the last evaluation

    # --- when ---------------------------------------------------------------------------------

    def due(self, epoch: int, saved: bool) -> bool:
        """After epoch `epoch` (complete): every `every` epochs, or (every = 0) when a checkpoint was saved."""
        if any(row["epoch"] == epoch for row in self.history):  # a resumed run never evaluates an epoch twice
            return False
        return saved if self.during.every == 0 else epoch % self.during.every == 0

    @property
    def has_base(self) -> bool:
        return any(row["epoch"] == 0 for row in self.history)

    # --- what ---------------------------------------------------------------------------------

    @cached_property
    def faces(self):
        e = self.settings.evaluation
        return load_face_models(e.face_detector, e.face_recognizer, e.face_score_threshold)

    @cached_property
    def references(self):
        return reference_embeddings(self.faces, subject_photos(self.ws))

    @cached_property
    def clip(self):
        return load_embedder("clip", self.settings.evaluation.clip_model, self.device)

    def items(self) -> list[tuple[str, int]]:
        e = self.settings.evaluation
        return [(prompt, e.seed + i) for prompt in e.prompts for i in range(self.during.seeds)]

    def evaluate(self, pipe: Any, step: int, epoch: int) -> Row:
        """Generate and score; the row (step, epoch, face_identity, face_no_face, clip_t, ...) joins the history."""
        started, items = time.monotonic(), self.items()
        images = generate_images(pipe, self.settings, [p for p, _ in items], [s for _, s in items])  # as the grid does
        row: Row = {"step": step, "epoch": epoch, **score_identity(self.faces, images, self.references).summary()}
        if self.during.prompt_fidelity:
            pictures = embed_images(self.clip, images)
            row["clip_t"] = mean_paired_similarity(pictures, clip_text_embeddings(self.clip, [plain_text(p) for p, _ in items]))
        folder = self.ws.samples / "evaluation"
        for index, image in enumerate(images):
            save_sample(image, folder / f"epoch{epoch:04d}-{index:02d}.jpg")
        row["seconds"] = time.monotonic() - started
        self.history.append(row)
        self.write()
        self.last = (step, items, images)
        return row

    def share(self, model_key: str, step: int) -> int:
        """Record the last evaluation's images as those of the weights `model_key` names (a checkpoint
        saved at `step`, or the base model at step 0) in the evaluate stage's image cache; how many
        (0 when that evaluation was at another step: other weights)."""
        if self.last is None or self.last[0] != step:
            return 0
        _, items, images = self.last
        gen, index = generation_settings(self.settings), HashIndex()
        for (prompt, seed), image in zip(items, images, strict=True):
            record_image(self.ws, index, image_key(model_key, prompt, seed, gen), image, source=FROM_TRAINING)
        return len(images)

    def write(self) -> Path:
        out = io.StringIO()
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        return write_atomic(self.ws.report(HISTORY_FILE), out.getvalue())

    # --- stop ---------------------------------------------------------------------------------

    def stop_reason(self) -> str | None:
        """Why training should stop now (early_stop on), or None."""
        base = next((row for row in self.history if row["epoch"] == 0), None)
        runs = [row for row in self.history if row["epoch"] > 0]
        if not self.during.early_stop or not runs:
            return None
        tolerance = self.settings.evaluation.selection.fidelity_tolerance
        last = runs[-1]
        if base and last.get("clip_t") is not None and base.get("clip_t") is not None and \
                last["clip_t"] < base["clip_t"] - tolerance:
            return (f"prompt fidelity {last['clip_t']:.4f} fell below the base model's {base['clip_t']:.4f} - "
                    f"{tolerance:g}")
        scores = [r.get("face_identity") for r in runs]
        best_at, best = None, None
        for i, value in enumerate(scores):
            if value is not None and (best is None or value > best + self.during.min_delta):
                best_at, best = i, value
        waited = len(scores) - 1 - (best_at if best_at is not None else -1)
        if waited >= self.during.patience:
            return (f"face identity has not improved by {self.during.min_delta:g} for {waited} evaluations "
                    f"(best {best if best is not None else float('nan'):.4f} at epoch "
                    f"{runs[best_at]['epoch'] if best_at is not None else '-'})")
        return None
