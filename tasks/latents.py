"""Prefect task of stage 7: VAE latents and frozen text-encoder outputs (the work: trainer/latents.py)."""

from __future__ import annotations

from prefect import get_run_logger, task

from likeness.tasks.common import StagePolicy, progress
from likeness.trainer.content import HashIndex
from likeness.trainer.latents import latents_key, latents_stage
from likeness.trainer.settings import Settings
from likeness.trainer.stages import StageResult
from likeness.trainer.workspace import Workspace


@task(name="cache-latents", cache_policy=StagePolicy(key_fn=latents_key))
def cache_latents(manifest: StageResult, settings: Settings, ws: Workspace, device: str = "auto") -> StageResult:
    """Latents + downscaled masks per image and text-encoder outputs per caption, keyed by content."""
    result = latents_stage(manifest, settings, ws, HashIndex(ws.hash_index), device, progress("latents"))
    get_run_logger().info(result.summary())
    return result
