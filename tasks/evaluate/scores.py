"""Evaluation, stage "scores": one row of metrics per checkpoint (and the base model).

- dino, clip_i (likeness): mean pairwise cosine similarity of the column's generated images and
  the subject's training photos (manifest rows of subject concepts, no validation concepts),
  both as head crops when `evaluation.head_crops` (see `likeness/models/embeddings.py`);
- face_identity (who it is): the mean cosine similarity of each generated image's face with the
  faces of the training photos (YuNet + SFace, `likeness/models/faces.py`), over the images where a
  face was found, with face_no_face (the share of images without one) and the spread
  (face_identity_std, _min, _max);
- clip_t (prompt fidelity): CLIP similarity of each whole generated image with its prompt;
- class_prior_loss, validation_loss: measured by the grid stage with the loaded weights.
Metrics not in `evaluation.metrics` are None. Each (checkpoint, metric) value is a record keyed by
the content of the images and photos it reads and the model's content, so a new checkpoint is
scored alone and models load only when some record is missing.

Writes `evaluation/scores.json` (the table `likeness select` reads) and `evaluation/scores.csv`.

    result = scores_stage(grid_result, settings, ws, ws.hashes())
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from likeness.content import HashIndex, bytes_digest, digest_parts, model_fingerprint
from likeness.files import write_atomic
from likeness.manifest import read_manifest
from likeness.models.faces import SUMMARY_KEYS, face_model_files, load_face_models, open_photo, reference_embeddings, score_identity
from likeness.settings import Settings
from likeness.stages import Counts, ItemRecords, Row, StageResult
from likeness.tasks.common import StagePolicy
from likeness.tasks.evaluate.grid import (
    LOSSES,
    EvaluationError,
    evaluation_dir,
    read_eval_table,
    write_eval_table,
)
from likeness.tasks.evaluate.select import METRICS, likeness
from likeness.tasks.masks import item_settings
from likeness.workspace import Workspace

SCORES_VERSION = 3  # 2: CLIP-T reads plain_text(prompt); 3: face identity
IMAGE_METRICS = {"dino": "dino", "clip_i": "clip", "clip_t": "clip"}  # metric -> embedder kind


def _model_name(settings: Settings, kind: str) -> str:
    return settings.evaluation.dino_model if kind == "dino" else settings.evaluation.clip_model


def crop_settings(settings: Settings, index: HashIndex) -> Any:
    """What changes a head crop: off, or CLIPSeg's model content and mask settings."""
    if not settings.evaluation.head_crops:
        return None
    return item_settings(settings.masks, model_fingerprint(settings.masks.model, index))


def scores_key(grid: StageResult, settings: Settings, ws: Workspace) -> str:
    index = ws.hashes()
    models = {kind: model_fingerprint(_model_name(settings, kind), index) for kind in ("dino", "clip")}
    crops = crop_settings(settings, index)
    manifest = index.digest(ws.manifest) if ws.manifest.is_file() else None
    faces = face_settings(settings, index) if "face_identity" in settings.evaluation.metrics else None
    index.save()
    return digest_parts("scores", SCORES_VERSION, grid.table_digest, sorted(settings.evaluation.metrics), models, crops,
                        manifest, faces)


def face_settings(settings: Settings, index: HashIndex) -> Any:
    """What changes a face identity: the two model files' content and the detection threshold."""
    e = settings.evaluation
    files = face_model_files(e.face_detector, e.face_recognizer)
    if not all(path.is_file() for path in files):
        load_face_models(e.face_detector, e.face_recognizer, e.face_score_threshold)  # says which file is wrong
    return [index.digest(path) for path in files], e.face_score_threshold  # no model load (nor cv2) for a key


# --- inputs ----------------------------------------------------------------------------------


def reference_rows(ws: Workspace) -> list[Row]:
    """The subject's training photos: manifest rows of subject concepts, validation concepts excluded."""
    if not ws.manifest.is_file():
        raise EvaluationError(f"likeness compares with the training photos listed in {ws.manifest}, which does not "
                              "exist: run `likeness prepare` first, or drop dino and clip_i from evaluation.metrics")
    df = read_manifest(ws.manifest, ws)
    rows = df[(df["role"] == "subject") & ~df["validation"].astype(bool)].sort_values("id")
    if rows.empty:
        raise EvaluationError(f"{ws.manifest}: no subject photos to compare with; add a concept with role 'subject'")
    return rows.to_dict("records")


def reference_crop(row: Row, head_crops: bool) -> Image.Image:
    """A training photo's head (its mask's box), or the photo's area on the padded canvas without a mask."""
    from likeness.models.embeddings import head_crop

    image = Image.open(row["prepared_path"]).convert("RGB")
    if not head_crops:
        return image
    mask_path = _text(row.get("mask_path"))
    if mask_path:
        return head_crop(image, np.asarray(Image.open(mask_path).convert("L")))
    left, top = int(row["offset_left"]), int(row["offset_top"])
    return image.crop((left, top, left + int(row["scaled_width"]), top + int(row["scaled_height"])))


class Inputs:
    """Models, photos and crops, each loaded on first use (nothing loads when every record hits)."""

    def __init__(self, settings: Settings, ws: Workspace):
        from likeness.models.devices import resolve_device  # here: torch and the models are not needed for a key
        from likeness.models.embeddings import embed_images, load_embedder

        self.settings, self.ws, self.device = settings, ws, resolve_device(settings.run.device)
        self.embedder = cache(lambda kind: load_embedder(kind, _model_name(settings, kind), self.device))
        self.references = cache(lambda kind: embed_images(self.embedder(kind), self._photos()))
        self._photos = cache(lambda: [reference_crop(r, settings.evaluation.head_crops) for r in reference_rows(ws)])
        self._clipseg = cache(self._load_clipseg)
        e = settings.evaluation
        self.faces = cache(lambda: load_face_models(e.face_detector, e.face_recognizer, e.face_score_threshold))
        self.face_references = cache(self._face_references)

    def _face_references(self) -> np.ndarray:
        """The faces of the subject's original photos (larger than the prepared ones), one per photo that has one."""
        rows = reference_rows(self.ws)
        photos = [open_photo(r["source_path"] if Path(r["source_path"]).is_file() else r["prepared_path"]) for r in rows]
        found = reference_embeddings(self.faces(), photos)
        if not len(found):
            raise EvaluationError(f"face_identity: no face found in any of the {len(rows)} subject photos of "
                                  f"{self.ws.manifest}; use photos where the face is visible, or drop face_identity "
                                  "from evaluation.metrics")
        return found

    def _load_clipseg(self) -> tuple:
        from likeness.tasks.masks import load_model

        return load_model(self.settings.masks.model, self.settings.run.device)

    def crops(self, paths: list[str]) -> list[Image.Image]:
        from likeness.models.embeddings import clipseg_head_masks, head_crop

        images = [Image.open(p).convert("RGB") for p in paths]
        if not self.settings.evaluation.head_crops:
            return images
        masks = clipseg_head_masks(images, self._clipseg(), self.settings.masks)
        return [head_crop(image, mask) for image, mask in zip(images, masks, strict=True)]


# --- the stage -------------------------------------------------------------------------------


def measure(metric: str, inputs: Inputs, images: list[Row]) -> float:
    """One image metric of one column's images."""
    from likeness.models.embeddings import clip_text_embeddings, embed_images, mean_paired_similarity, mean_pairwise_similarity
    from likeness.models.prompt_weights import plain_text

    embedder = inputs.embedder(IMAGE_METRICS[metric])
    if metric == "clip_t":
        pictures = embed_images(embedder, [Image.open(r["image"]) for r in images])
        return mean_paired_similarity(pictures, clip_text_embeddings(embedder, [plain_text(r["prompt"]) for r in images]))  # "(x:1.2)" -> "x"
    return mean_pairwise_similarity(embed_images(embedder, inputs.crops([r["image"] for r in images])),
                                    inputs.references(IMAGE_METRICS[metric]))


def measure_faces(inputs: Inputs, images: list[Row]) -> dict[str, float | None]:
    """Face identity of one column's images: mean, share without a face, spread."""
    pictures = [Image.open(r["image"]).convert("RGB") for r in images]
    return score_identity(inputs.faces(), pictures, inputs.face_references()).summary()


def _face_values(inputs: Inputs, images: list[Row], records: ItemRecords, photos: str, faces: Any,
                 counts: Counts) -> dict[str, float | None]:
    key = digest_parts("score", SCORES_VERSION, "face_identity", [r["image_hash"] for r in images], photos, faces)
    record = records.get(key)
    if record is None:
        record = {"value": measure_faces(inputs, images), "outputs": {}}
        records.put(key, record)
        counts.processed += 1
    else:
        counts.reused += 1
    return record["value"]


def scores_stage(grid: StageResult, settings: Settings, ws: Workspace, index: HashIndex) -> StageResult:
    """A row of scores per column of the grid; writes evaluation/scores.json and scores.csv."""
    table = read_eval_table(grid, ws)
    enabled = [m for m in METRICS if m in settings.evaluation.metrics]
    image_metrics = [m for m in enabled if m in IMAGE_METRICS]
    inputs, records = Inputs(settings, ws), ItemRecords(evaluation_dir(ws) / "records" / "scores", index, ws)
    photos = _photo_digest(ws, index) if {"dino", "clip_i", "face_identity"} & set(enabled) else None
    faces = face_settings(settings, index) if "face_identity" in enabled else None
    crops = crop_settings(settings, index)
    counts, rows = Counts(), []
    for column in table["extra"]["candidates"]:
        images = sorted((r for r in table["rows"] if r["checkpoint"] == column["name"]),
                        key=lambda r: (r["prompt_index"], r["seed"]))
        values: dict[str, float | None] = {m: None for m in (*METRICS, *SUMMARY_KEYS)}
        if faces is not None:
            values.update(_face_values(inputs, images, records, photos, faces, counts))
        for metric in image_metrics:
            model = model_fingerprint(_model_name(settings, IMAGE_METRICS[metric]), index)
            key = digest_parts("score", SCORES_VERSION, metric, [(r["image_hash"], r["prompt"]) for r in images],
                               model, None if metric == "clip_t" else (photos, crops))
            record = records.get(key)
            if record is None:
                record = {"value": measure(metric, inputs, images), "outputs": {}}
                records.put(key, record)
                counts.processed += 1
            else:
                counts.reused += 1
            values[metric] = record["value"]
        for metric in LOSSES:
            if metric in enabled:
                values[metric] = table["extra"]["losses"][column["name"]].get(metric)
        rows.append({"checkpoint": column["name"], "label": "base" if column["epoch"] is None else f"epoch {column['epoch']}",
                     "path": column["path"], "epoch": column["epoch"], "step": column["step"],
                     "base": column["epoch"] is None, **values, "likeness": likeness(values, enabled)})
    frame = pd.DataFrame(ws.portable(rows)).astype({"epoch": "Int64"})  # the base model's epoch is empty, not NaN
    csv = frame.to_csv(index=False, lineterminator="\n").encode("utf-8")
    csv_path = write_atomic(evaluation_dir(ws) / "scores.csv", csv)
    result = write_eval_table(ws, "scores", rows, counts, {str(csv_path): bytes_digest(csv)}, {"metrics": enabled})
    index.save()
    return result


def _photo_digest(ws: Workspace, index: HashIndex) -> str:
    return digest_parts([(r["id"], r["source_hash"], r["prepared_hash"], _text(r.get("mask_hash")))
                         for r in reference_rows(ws)])


def _text(value: Any) -> str | None:
    """A manifest cell as a string, or None for an empty one (pandas reads those as NaN)."""
    return value if isinstance(value, str) and value else None


# --- Prefect task ----------------------------------------------------------------------------


@task(name="score-checkpoints", cache_policy=StagePolicy(key_fn=scores_key))
def score_checkpoints(grid: StageResult, settings: Settings, ws: Workspace) -> StageResult:
    """Likeness (DINO, CLIP-I), prompt fidelity (CLIP-T) and the losses, one row per checkpoint."""
    result = scores_stage(grid, settings, ws, ws.hashes())
    rows = [{k: v for k, v in row.items() if k != "path"} for row in read_eval_table(result, ws)["rows"]]
    create_table_artifact(rows, key="scores", description="Scores per checkpoint (base model first)")
    get_run_logger().info(result.summary())
    return ws.portable(result)
