"""The evaluation's per-image cache, shared by the grid stage and the in-training evaluation.

A generated evaluation image is identified by the weights' content fingerprint
(`content.model_fingerprint` of the checkpoint or base model), the prompt, the seed and the
generation settings; it lives in `<workspace>/evaluation/images/<key>.png` with its record in
`evaluation/records/images/<key>.json`. The grid stage (`tasks/evaluate/grid.py`) generates what
the records lack; the in-training evaluation (`trainer/evaluation.py`) records the images it made
with the weights a checkpoint was saved with, so the grid finds them and does not generate them
again. No Prefect here: the trainer imports it.

    key = image_key(model_fingerprint(path, index), "photo of ohwx man", 0, generation_settings(settings))
    row = record_image(ws, index, key, image, source=FROM_TRAINING)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from likeness.content import HashIndex, digest_parts
from likeness.latent_index import model_parts
from likeness.settings import Settings
from likeness.stages import ItemRecords, Row
from likeness.workspace import Workspace

EVALUATE_VERSION = 1
FROM_TRAINING = "in-training evaluation"  # a record's `source` when the training run made the image


def evaluation_dir(ws: Workspace) -> Path:
    return ws.root / "evaluation"


def generation_settings(settings: Settings) -> dict[str, Any]:
    """What changes a generated image besides weights, prompt and seed."""
    e = settings.evaluation
    return {"negative_prompt": e.negative_prompt, "steps": e.steps, "cfg": e.cfg_scale, "sampler": e.sampler,
            "resolution": e.resolution or settings.resize.resolution,
            "clip_skip": tuple(getattr(settings.training, part).clip_skip for part in model_parts(settings))}
    # SD 1.5 has no text_encoder_2: its settings change no image, so they are not in the keys


def generate_images(pipe: Any, settings: Settings, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """The evaluation image of each (prompt, seed) pair, made as `generation_settings` says: the one way
    the grid and the in-training evaluation generate, so that their images are each other's."""
    from likeness.models import sampling  # diffusers: only where an image is made

    gen = generation_settings(settings)
    return sampling.generate(pipe, prompts, [gen["negative_prompt"]] * len(prompts), seeds, steps=gen["steps"],
                             cfg=gen["cfg"], sampler=gen["sampler"], resolution=gen["resolution"],
                             clip_skip_1=gen["clip_skip"][0],
                             clip_skip_2=settings.training.text_encoder_2.clip_skip)  # SD 1.5 ignores it


def image_key(model_key: str, prompt: str, seed: int, gen: dict[str, Any]) -> str:
    """The cache key of one image: weights (their content fingerprint), prompt, seed, generation settings."""
    return digest_parts("image", EVALUATE_VERSION, model_key, prompt, seed, gen)


def image_records(ws: Workspace, index: HashIndex) -> ItemRecords:
    return ItemRecords(evaluation_dir(ws) / "records" / "images", index, ws)


def image_row(ws: Workspace, index: HashIndex, key: str, image: Image.Image, source: str | None = None) -> Row:
    """Write the image as `images/<key>.png`; its record row (image, image_hash, outputs[, source])."""
    from likeness.models.sampling import save_sample  # diffusers: only where an image is made

    path = save_sample(image, evaluation_dir(ws) / "images" / f"{key}.png")
    digest = index.digest(path)
    return {"image": str(path), "image_hash": digest, "outputs": {str(path): digest},
            **({"source": source} if source else {})}


def record_image(ws: Workspace, index: HashIndex, key: str, image: Image.Image, source: str | None = None) -> Row:
    """`image_row`, recorded under `key` at once (as the grid's `map_cached` would)."""
    row = image_row(ws, index, key, image, source)
    image_records(ws, index).put(key, row)
    return row
