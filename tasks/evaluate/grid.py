"""Evaluation, stage "grid": every checkpoint (and the base model) x the evaluation prompts x N
seeds, generated with the same seeds for every checkpoint, as labelled grids; and each
checkpoint's deterministic class-prior and validation losses (`tasks/evaluate/class_prior.py`), which
need the same loaded weights.

Everything is cached per item by content: an image's record is keyed by (checkpoint content
hash, prompt, negative prompt, seed, generation settings), a loss's by (checkpoint content hash,
the cached latents it reads, the loss settings). Adding a checkpoint generates only its column;
adding a prompt only that prompt's images; a checkpoint whose items are all recorded is not
even loaded. Layout, under the workspace:

    evaluation/images/<key>.png          one generated image
    evaluation/records/<kind>/<key>.json per-item records (images, losses, scores)
    evaluation/grids/prompt-NN.jpg       per prompt: columns = checkpoints by epoch, rows = seeds
    evaluation/grids/overview.jpg        columns = checkpoints, rows = prompts (first seed)
    evaluation/<stage>.json              each stage's table (grid, scores, select)

    result = grid_stage([Path("workspace/save/person-15.safetensors")], settings, ws, ws.hashes())
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from likeness.content import HashIndex, bytes_digest, digest_parts, file_digest, model_fingerprint
from likeness.evaluation_images import (
    EVALUATE_VERSION, FROM_TRAINING, evaluation_dir, generate_images, generation_settings, image_key, image_records,
    image_row,
)
from likeness.files import write_atomic
from likeness.latent_index import model_parts, read_latents_index
from likeness.manifest import read_manifest
from likeness.models.checkpoint_info import FOLDER_METADATA, load_checkpoint_metadata
from likeness.settings import Settings
from likeness.stages import Counts, ItemRecords, PrepareError, Progress, Row, StageResult, map_cached
from likeness.tasks.common import StagePolicy
from likeness.tasks.evaluate.image_grid import grid_image, thumbnail
from likeness.workspace import Workspace

if TYPE_CHECKING:  # models and torch are imported where images are made: a cached run does not pay for them
    import torch

    from likeness.tasks.evaluate.class_prior import LossKind

LOSSES: dict[str, LossKind] = {"class_prior_loss": "class_prior", "validation_loss": "validation"}


class EvaluationError(PrepareError):
    """Missing or unusable evaluation inputs: fixing them (not retrying) helps."""


def eval_table(ws: Workspace, stage: str) -> Path:
    return evaluation_dir(ws) / f"{stage}.json"


def write_eval_table(ws: Workspace, stage: str, rows: list[Row], counts: Counts, outputs: dict[str, str],
                     extra: dict[str, Any]) -> StageResult:
    """Like `stages.write_table`, in `evaluation/<stage>.json` (paths relative, `Workspace.portable`)."""
    payload = ws.portable({"stage": stage, "version": EVALUATE_VERSION, "rows": rows, "outputs": outputs, "extra": extra})
    data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode("utf-8")
    path = write_atomic(eval_table(ws, stage), data)
    return StageResult(stage, path, bytes_digest(data), counts.processed, counts.reused)


def read_eval_table(result: StageResult, ws: Workspace) -> dict[str, Any]:
    """An evaluation table, its paths absolute in `ws`."""
    return ws.local(json.loads(result.table.read_text(encoding="utf-8")))


# --- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A column of the grid: the base model or a saved checkpoint."""

    name: str
    path: str
    epoch: int | None  # None: the base model
    step: int
    key: str  # content fingerprint: what every cache record of this column is keyed on

    @property
    def is_base(self) -> bool:
        return self.epoch is None

    @property
    def label(self) -> str:
        return "base" if self.is_base else f"epoch {self.epoch}"


def find_checkpoints(ws: Workspace) -> list[Path]:
    """Every saved checkpoint in `workspace/save`: .safetensors files and diffusers folders we wrote."""
    folder = ws.checkpoints
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  ((p.is_file() and p.suffix == ".safetensors") or (p / FOLDER_METADATA).is_file()))


def candidates(checkpoints: list[str | Path], settings: Settings, index: HashIndex) -> list[Candidate]:
    """The base model first, then the checkpoints by (epoch, step, name); errors name the bad file."""
    found = []
    for path in map(Path, checkpoints):
        if not path.exists():
            raise EvaluationError(f"{path}: no such checkpoint; pass files written by `likeness train`")
        try:
            info = load_checkpoint_metadata(path)
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        found.append(Candidate(path.name, str(path.resolve()), info.epoch, info.step, model_fingerprint(str(path), index)))
    names = [c.name for c in found]
    if len(set(names)) != len(names) or "base" in names:
        raise EvaluationError(f"checkpoint file names must be unique and not 'base' (they label the grid): {names}")
    found.sort(key=lambda c: (c.epoch, c.step, c.name))
    base = settings.model.base_model
    return [Candidate("base", base, None, 0, model_fingerprint(base, index)), *found]


def load_candidate(candidate: Candidate, settings: Settings, device: torch.device) -> Any:
    """The SDXL or SD 1.5 pipeline of a column (float32 on CPU, the training dtype on a GPU); a LoRA
    checkpoint is the base model with the LoRA merged in."""
    import torch

    from likeness.models.loading import is_single_file, load_pipeline
    from likeness.models.lora import apply_lora, is_lora_file

    base, config = settings.model.base_model, settings.model.config
    if not candidate.is_base and is_lora_file(candidate.path):
        base_column = Candidate("base", base, None, 0, "")
        return apply_lora(load_candidate(base_column, settings, device), candidate.path)
    if config is None and not candidate.is_base and not is_single_file(base):
        config = base  # a single-file checkpoint takes its component configs from the base model
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, settings.training.train_dtype)
    family = settings.model.model_type if candidate.is_base else "auto"  # a saved file says what it is
    pipe = load_pipeline(candidate.path, family, config=config, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- keys ------------------------------------------------------------------------------------


def loss_settings(settings: Settings) -> dict[str, Any]:
    t = settings.training
    return {"seed": settings.evaluation.seed, "timesteps": settings.evaluation.loss_timesteps,
            "noise": t.noise.model_dump(mode="json"), "loss": t.loss.model_dump(mode="json"),
            "trained": tuple(getattr(t, part).train for part in model_parts(settings)), "clip_skip": generation_settings(settings)["clip_skip"],
            "held_out": settings.evaluation.class_prior_images}


def seeds(settings: Settings) -> list[int]:
    return [settings.evaluation.seed + i for i in range(settings.evaluation.seeds_per_prompt)]


def _optional_digest(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None


def grid_key(checkpoints: list[str], settings: Settings, ws: Workspace) -> str:
    """The grid stage's cache key: checkpoint contents, prompts, generation and loss settings, prepared data."""
    index = ws.hashes()
    columns = [(c.name, c.epoch, c.step, c.key) for c in candidates(checkpoints, settings, index)]  # content, not where
    config = model_fingerprint(settings.model.config, index) if settings.model.config else None
    index.save()
    e = settings.evaluation
    return digest_parts("grid", EVALUATE_VERSION, columns, config, e.prompts, seeds(settings), generation_settings(settings),
                        loss_settings(settings), sorted(set(e.metrics) & set(LOSSES)),
                        _optional_digest(ws.manifest), _optional_digest(ws.latents_index))


# --- the stage -------------------------------------------------------------------------------


def grid_stage(checkpoints: list[str], settings: Settings, ws: Workspace, index: HashIndex,
               progress: Progress | None = None) -> StageResult:
    """Generate what the records lack, measure the losses, draw the grids, write `evaluation/grid.json`."""
    columns = candidates(checkpoints, settings, index)
    items = [{"prompt_index": p, "prompt": prompt, "seed": seed}
             for p, prompt in enumerate(settings.evaluation.prompts) for seed in seeds(settings)]
    loss_inputs = _loss_inputs(settings, ws, index)
    from likeness.models.devices import resolve_device

    device = resolve_device(settings.run.device)
    rows, losses, counts = [], {}, Counts()
    for done, column in enumerate(columns):
        pipe = cache(lambda column=column: load_candidate(column, settings, device))
        images, column_counts = _generate_column(column, items, pipe, settings, ws, index)
        rows += [{"checkpoint": column.name, "label": column.label, "epoch": column.epoch, **item, **image}
                 for item, image in zip(items, images, strict=True)]
        losses[column.name] = _column_losses(column, loss_inputs, pipe, settings, ws, index)
        counts.processed += column_counts.processed
        counts.reused += column_counts.reused
        pipe.cache_clear()  # one pipeline in memory at a time
        if progress:
            progress(done + 1, len(columns))
    grids = write_grids(columns, rows, settings, ws)
    outputs = {row["image"]: row["image_hash"] for row in rows}
    outputs.update({str(p): index.digest(p) for p in grids})
    extra = {"candidates": [asdict(c) for c in columns], "losses": losses, "grids": [str(p) for p in grids],
             "from_training": sum(row.get("source") == FROM_TRAINING for row in rows)}
    result = write_eval_table(ws, "grid", rows, counts, outputs, extra)
    index.save()
    return result


def _generate_column(column: Candidate, items: list[Row], pipe, settings: Settings, ws: Workspace,
                     index: HashIndex) -> tuple[list[Row], Counts]:
    """The column's images: recorded ones (by the grid or the in-training evaluation) reused, the rest generated."""
    gen = generation_settings(settings)

    def key(item: Row) -> str:
        return image_key(column.key, item["prompt"], item["seed"], gen)

    def compute(batch: list[Row]) -> list[Row]:
        images = generate_images(pipe(), settings, [i["prompt"] for i in batch], [i["seed"] for i in batch])
        return [image_row(ws, index, key(item), image) for item, image in zip(batch, images, strict=True)]

    rows, counts = map_cached(items, key, compute, image_records(ws, index), batch_size=1)
    return [{k: v for k, v in row.items() if k != "outputs"} for row in rows], counts


def _loss_inputs(settings: Settings, ws: Workspace, index: HashIndex) -> dict[str, tuple[list[Row], str]]:
    """Per enabled loss metric: its rows from the latent cache and a digest of what they read."""
    from likeness.tasks.evaluate.class_prior import loss_rows

    wanted = [m for m in settings.evaluation.metrics if m in LOSSES]
    if not wanted:
        return {}
    if not ws.manifest.is_file() or not ws.latents_index.is_file():
        raise EvaluationError(
            f"the class-prior and validation losses read the latent cache ({ws.latents_index}), which does not exist: "
            "run `likeness prepare` first, or drop class_prior_loss and validation_loss from evaluation.metrics")
    manifest, latents = read_manifest(ws.manifest, ws), read_latents_index(ws.latents_index, ws)
    inputs = {}
    for metric in wanted:
        rows = loss_rows(manifest, latents, LOSSES[metric], settings.evaluation.class_prior_images)
        content = [(r["id"], r["caption"], index.digest(r["latent_path"]), r["text_path"] and index.digest(r["text_path"]))
                   for r in rows]
        inputs[metric] = (rows, digest_parts(content, loss_settings(settings)))
    return inputs


def _column_losses(column: Candidate, inputs: dict[str, tuple[list[Row], str]], pipe, settings: Settings,
                   ws: Workspace, index: HashIndex) -> dict[str, float | None]:
    from likeness.tasks.evaluate.class_prior import deterministic_loss

    records = ItemRecords(evaluation_dir(ws) / "records" / "losses", index, ws)
    values = {}
    for metric, (rows, content) in inputs.items():
        key = digest_parts("loss", EVALUATE_VERSION, metric, column.key, content)
        record = records.get(key)
        if record is None:
            record = {"value": deterministic_loss(pipe(), rows, settings) if rows else None, "outputs": {}}
            records.put(key, record)
        values[metric] = record["value"]
    return values


# --- grids -----------------------------------------------------------------------------------


def write_grids(columns: list[Candidate], rows: list[Row], settings: Settings, ws: Workspace) -> list[Path]:
    """One grid per prompt (rows = seeds) and the overview (rows = prompts, first seed); overview last."""
    from likeness.models.sampling import save_sample

    by_cell = {(r["checkpoint"], r["prompt_index"], r["seed"]): r["image"] for r in rows}
    labels, folder, first = [c.label for c in columns], evaluation_dir(ws) / "grids", seeds(settings)[0]
    paths = []
    for p, prompt in enumerate(settings.evaluation.prompts):
        cells = [[Image.open(by_cell[c.name, p, s]) for s in seeds(settings)] for c in columns]
        image = grid_image(cells, labels, [f"seed {s}" for s in seeds(settings)], title=prompt)
        paths.append(save_sample(image, folder / f"prompt-{p:02d}.jpg"))
    prompts = settings.evaluation.prompts
    cells = [[Image.open(by_cell[c.name, p, first]) for p in range(len(prompts))] for c in columns]
    overview = grid_image(cells, labels, [f"prompt {p + 1}" for p in range(len(prompts))],
                          title=f"seed {first}: " + " | ".join(f"{p + 1}: {t}" for p, t in enumerate(prompts)))
    paths.append(save_sample(overview, folder / "overview.jpg"))
    return paths


def reuse_line(result: StageResult, from_training: int) -> str:
    """E.g. "evaluate: 3 images reused from the in-training evaluation, 0 from earlier runs, 15 generated"."""
    return (f"evaluate: {from_training} images reused from the in-training evaluation, "
            f"{result.reused - from_training} from earlier runs, {result.processed} generated")


def grid_markdown(result: StageResult, ws: Workspace, max_side: int = 768) -> str:
    """Markdown for the Prefect UI: each grid inline (a downscaled JPEG data URI) and its file path."""
    table = read_eval_table(result, ws)
    lines = [f"# Evaluation grids\n\n{len(table['extra']['candidates'])} columns (base model first), "
             f"{reuse_line(result, table['extra'].get('from_training', 0)).removeprefix('evaluate: ')}.\n"]
    for path in map(Path, table["extra"]["grids"]):
        lines += [f"## {path.stem}\n", f"![{path.stem}]({_data_uri(path, max_side)})\n", f"`{path}`\n"]
    return "\n".join(lines)


def _data_uri(path: Path, max_side: int) -> str:
    buffer = io.BytesIO()
    thumbnail(Image.open(path).convert("RGB"), max_side).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- Prefect task ----------------------------------------------------------------------------


@task(name="generate-grid", tags=["gpu"], cache_policy=StagePolicy(key_fn=grid_key))  # holds the GPU slot
def generate_grid(checkpoints: list[str], settings: Settings, ws: Workspace) -> StageResult:
    """Base model + every checkpoint x prompts x seeds (same seeds everywhere), labelled grids, losses."""
    logger = get_run_logger()
    result = grid_stage(checkpoints, settings, ws, ws.hashes(),
                        lambda done, total: logger.info("grid: %d / %d columns done", done, total))
    create_markdown_artifact(grid_markdown(result, ws), key="grid", description="Checkpoints x prompts x seeds")
    extra = read_eval_table(result, ws)["extra"]
    logger.info("%s; overview: %s", result.summary(), extra["grids"][-1])
    logger.info(reuse_line(result, extra["from_training"]))
    return ws.portable(result)
