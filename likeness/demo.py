"""The demo on the embedded defaults (`make demo`, `likeness demo`): tiny models, CPU, no download.

What it runs today is everything built so far, for real: it builds the tiny SDXL-shaped and
CLIPSeg models from configs (random weights), loads them back through the same loaders a real
model takes, generates the profile's sampling prompts, and segments the `head` prompt in each
image with CLIPSeg. The images are noise-like because the weights are random; the point is that
every component is wired. As the prepare, train and evaluate stages land, they run here too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from likeness.trainer.files import atomic_path
from likeness.trainer.masks import segment
from likeness.trainer.models import load_clipseg, load_sdxl_pipeline
from likeness.trainer.sampling import generate
from likeness.trainer.settings import Settings
from likeness.trainer.tiny_models import TinyModels, save_tiny_models


@dataclass
class DemoResult:
    models: TinyModels
    samples: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return "\n".join([
            f"tiny models:  {self.models.sdxl.parent}",
            f"samples:      {', '.join(str(p) for p in self.samples)}",
            f"head masks:   {', '.join(str(p) for p in self.masks)}",
            f"timings:      {timings}",
        ])


def run_demo(settings: Settings, echo: Callable[[str], None] = print) -> DemoResult:
    """Build the tiny models where the profile expects them, then sample and segment with them."""
    models_dir = Path(settings.model.base_model).parent
    expected = (models_dir / "sdxl", models_dir / "clipseg")
    if (Path(settings.model.base_model), Path(settings.masks.model)) != expected:
        raise ValueError(
            f"the demo builds tiny models: the profile must set model.base_model = '{expected[0]}' and "
            f"masks.model = '{expected[1]}' (as profiles/demo-cpu.toml does)")
    torch.manual_seed(settings.run.seed)
    out = settings.run.workspace / "samples"
    seconds: dict[str, float] = {}

    with _timed(seconds, "build models"):
        echo(f"[1/3] building tiny models in {models_dir}")
        result = DemoResult(models=save_tiny_models(models_dir, seed=settings.run.seed), seconds=seconds)
    with _timed(seconds, "generate"):
        echo("[2/3] loading the SDXL pipeline and generating the sampling prompts")
        images = generate_samples(settings)
        result.samples = [_save(image, out / f"sample-{i}.png") for i, image in enumerate(images)]
    with _timed(seconds, "segment"):
        echo(f"[3/3] segmenting {settings.masks.prompts} with CLIPSeg")
        masks = segment_heads(images, settings)
        result.masks = [_save(mask, out / f"sample-{i}-masklabel.png") for i, mask in enumerate(masks)]
    return result


def generate_samples(settings: Settings) -> list[Image.Image]:
    """The sampling prompts through the same generation path training and evaluation use."""
    pipe = load_sdxl_pipeline(settings.model.base_model, config=settings.model.config)
    prompts = settings.sampling.prompts
    return generate(
        pipe, [p.prompt for p in prompts], [p.negative_prompt for p in prompts], [p.seed for p in prompts],
        steps=settings.sampling.steps, cfg=settings.sampling.cfg_scale, sampler=settings.sampling.sampler,
        resolution=settings.sampling.resolution or settings.resize.resolution,
    )


def segment_heads(images: list[Image.Image], settings: Settings) -> list[Image.Image]:
    """Head masks with the prepare stage's CLIPSeg algorithm (smooth, threshold, expand)."""
    model, processor = load_clipseg(settings.masks.model)
    masks = segment(images, model, processor, settings.masks, torch.device("cpu"))
    return [Image.fromarray(mask) for mask in masks]


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
