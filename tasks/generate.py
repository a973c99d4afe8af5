"""Stage 0, generate: regularization images from the base model (DreamBooth's prior preservation).

A regularization concept with `generate = N` gets N images of its class prompt (`generation.prompt`,
default its caption text, e.g. "man"), made by the base model at the training resolution before
anything else, so the user need not collect thousands of class photos (Ruiz et al. 2023,
"DreamBooth", section 3.3; diffusers' DreamBooth example does the same). Image i uses seed
`generation.seed + i`. Each image is cached by (base model content, prompt, negative prompt, seed,
steps, guidance, sampler, resolution, clip skip): a re-run generates nothing, a killed run
resumes with the images it lacks, a larger N adds only the new ones. The images go to
`workspace/regularization/<concept>/<concept>-NNNNN.png`; the scan lists them as that concept's
photos beside the real ones of its folder (ids `<concept>/generated/...`), so balancing `auto` and
every later stage see them like any photo. The base model loads only when some image is missing.

    result = generate_stage(settings, ws, ws.hashes())
    likeness stage generate --profile demo-cpu
"""

from __future__ import annotations

from functools import cache  # noqa: I001 (the scan imports this module: torch loads only when generating)
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from likeness.content import HashIndex, digest_parts, model_fingerprint
from likeness.settings import Concept, Settings
from likeness.stages import Counts, ItemRecords, Progress, Row, StageResult, map_cached, write_table
from likeness.tasks.common import StagePolicy, progress
from likeness.workspace import Workspace

GENERATE_VERSION = 1
GENERATED = "generated"  # the id prefix of generated images inside their concept


def generated_folder(ws: Workspace, concept: str) -> Path:
    """Where a concept's generated class images live (inside the workspace, never the user's folder)."""
    return ws.root / "regularization" / concept


def generating(concepts: list[Concept]) -> list[Concept]:
    return [c for c in concepts if c.enabled and c.generate > 0]


def image_settings(concept: Concept, settings: Settings) -> dict[str, Any]:
    """Everything but the seed and the model that changes a generated image."""
    g = settings.training
    return {"prompt": concept.class_prompt, "negative_prompt": concept.generation.negative_prompt,
            "steps": concept.generation.steps, "cfg": concept.generation.cfg_scale, "sampler": concept.generation.sampler,
            "resolution": settings.resize.resolution, "clip_skip": (g.text_encoder.clip_skip, g.text_encoder_2.clip_skip)}


def generate_key(settings: Settings, ws: Workspace) -> str:
    """Cache key of the stage: the base model's content and each generating concept's images."""
    concepts = generating(settings.concepts)
    index = ws.hashes()
    base = model_fingerprint(settings.model.base_model, index) if concepts else None
    index.save()
    return digest_parts("generate", GENERATE_VERSION, base,
                        [(c.name, c.generate, c.generation.seed, image_settings(c, settings)) for c in concepts])


def _load_base(settings: Settings) -> Any:
    from likeness.models.devices import resolve_device
    from likeness.tasks.evaluate.grid import Candidate, load_candidate

    base = settings.model.base_model
    return load_candidate(Candidate("base", base, None, 0, ""), settings, resolve_device(settings.run.device))


def generate_stage(settings: Settings, ws: Workspace, index: HashIndex, progress: Progress | None = None) -> StageResult:
    """Generate what the records lack, drop images beyond N, write `workspace/prepare/generate.json`."""
    concepts = generating(settings.concepts)
    base = model_fingerprint(settings.model.base_model, index) if concepts else None
    pipe = cache(lambda: _load_base(settings))
    records = ItemRecords(ws.item_records("generate"), index, ws)
    rows, counts = [], Counts()
    total, done = sum(c.generate for c in concepts), [0]
    for concept in concepts:
        gen, folder = image_settings(concept, settings), generated_folder(ws, concept.name)
        items = [{"id": f"{concept.name}/{GENERATED}/{concept.name}-{i:05d}", "concept": concept.name,
                  "path": str(folder / f"{concept.name}-{i:05d}.png"), "seed": concept.generation.seed + i}
                 for i in range(concept.generate)]

        def compute(batch: list[Row], gen: dict = gen) -> list[Row]:
            from likeness.models.sampling import generate, save_sample  # torch and diffusers: only when generating

            images = generate(pipe(), [gen["prompt"]] * len(batch), [gen["negative_prompt"]] * len(batch),
                              [item["seed"] for item in batch], steps=gen["steps"], cfg=gen["cfg"],
                              sampler=gen["sampler"], resolution=gen["resolution"], clip_skip_1=gen["clip_skip"][0],
                              clip_skip_2=gen["clip_skip"][1])
            out = []
            for item, image in zip(batch, images, strict=True):
                path = save_sample(image, item["path"])
                digest = index.digest(path)
                out.append({**item, "hash": digest, "outputs": {str(path): digest}})
            return out

        def report(finished: int, _: int, before: int = done[0]) -> None:
            if progress:
                progress(before + finished, total)

        found, concept_counts = map_cached(items, lambda item, gen=gen: digest_parts(
            "generated", GENERATE_VERSION, base, gen, item["seed"], ws.relative(item["path"])), compute, records,
            progress=report)
        done[0] += len(items)
        _remove_stale(folder, {Path(item["path"]).name for item in items})
        rows += found
        counts.processed += concept_counts.processed
        counts.reused += concept_counts.reused
    result = write_table(ws, "generate", GENERATE_VERSION, rows, counts)
    index.save()
    return result


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Generated images beyond N (N was lowered) would still be scanned: remove them."""
    if folder.is_dir():
        for path in folder.glob("*.png"):
            if path.name not in keep:
                path.unlink()


# --- Prefect task ----------------------------------------------------------------------------


@task(name="generate-regularization", tags=["gpu"], cache_policy=StagePolicy(key_fn=generate_key))
def generate_regularization(settings: Settings, ws: Workspace) -> StageResult:
    """The base model's class images for regularization concepts with `generate = N` (cached per image)."""
    result = generate_stage(settings, ws, ws.hashes(), progress("generate"))
    get_run_logger().info(result.summary())
    return ws.portable(result)
