"""The demo on the embedded defaults (`make demo`, `likeness demo`): tiny models, CPU, no download.

It builds the tiny SDXL-shaped, CLIPSeg, DINO and CLIP models from configs (random weights) where
`profiles/demo-cpu.toml` expects them, writes a small demo dataset from the photos that ship with
scikit-image (a "person" and a "regularization" concept, `likeness/demo_data.py`), and runs the
whole pipeline on them, for real, on the local (ephemeral) Prefect: prepare (resize, CLIPSeg head
masks, captions, balancing, manifest, latent cache) -> train -> evaluate (grid, scores) -> select.
Images come out noise-like because the weights are random; the point is that every stage runs.
A second `likeness demo` finishes fast: every stage is `Cached`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from likeness.settings import Settings


def demo_paths(settings: Settings) -> tuple[Path, Path]:
    """The models folder and the photos folder the profile points at; a clear error otherwise."""
    models = Path(settings.model.base_model).parent
    expected = {"model.base_model": models / "sdxl", "masks.model": models / "clipseg",
                "evaluation.dino_model": models / "dino", "evaluation.clip_model": models / "clip"}
    actual = {"model.base_model": settings.model.base_model, "masks.model": settings.masks.model,
              "evaluation.dino_model": settings.evaluation.dino_model, "evaluation.clip_model": settings.evaluation.clip_model}
    wrong = [f"{field} = '{expected[field]}'" for field in expected if Path(actual[field]) != expected[field]]
    photos = {Path(c.path).parent for c in settings.concepts}
    if wrong or len(photos) != 1:
        raise ValueError("the demo builds tiny models and writes its own photos: the profile must set "
                         + ", ".join(wrong or ["every concept's path under one photos folder"])
                         + " (as profiles/demo-cpu.toml does)")
    return models, photos.pop()


def write_demo_files(settings: Settings, echo: Callable[[str], None] = print) -> None:
    """Build the tiny models and write the demo photos where the demo profile expects them."""
    from likeness.demo_data import write_demo_photos
    from likeness.models.tiny_folders import all_complete

    models, photos = demo_paths(settings)
    echo(f"[demo] tiny models (random weights, built from configs) in {models}")
    if not all_complete(models, settings.run.seed):  # building them needs torch, diffusers, transformers
        from likeness.models.tiny import save_tiny_models

        save_tiny_models(models, seed=settings.run.seed)
    counts = {c.name: (8 if c.role == "subject" else 12) for c in settings.concepts}
    written = write_demo_photos(photos, seed=settings.run.seed, counts=counts)
    echo(f"[demo] photos in {photos}: " + ", ".join(f"{len(v)} {k}" for k, v in written.items()))


def missing_demo_files(settings: Settings) -> list[Path]:
    """The demo's model and photo folders that are not there yet; [] for a profile that is no demo."""
    try:
        models, _ = demo_paths(settings)
    except ValueError:
        return []
    folders = [models / name for name in ("sdxl", "clipseg", "dino", "clip")] + [Path(c.path) for c in settings.concepts]
    return [folder for folder in folders if not (folder.is_dir() and any(folder.iterdir()))]


def run_demo(settings: Settings, echo: Callable[[str], None] = print):
    """Build the tiny models and demo photos, then run the whole pipeline flow on them."""
    start = time.perf_counter()
    write_demo_files(settings, echo)
    echo("[demo] running the pipeline: prepare -> train -> evaluate -> select (progress below)")
    from likeness.flows.pipeline import pipeline

    result = pipeline(settings)
    echo(f"[demo] done in {time.perf_counter() - start:.0f} s")
    return result
