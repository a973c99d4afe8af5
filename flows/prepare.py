"""The prepare flow: photos -> prepared images, masks, captions -> validated manifest -> latent cache.

Everything before the GPU, stage after stage. Each stage is a cached, retryable task keyed on
the content it reads: a re-run with nothing changed finishes with every stage `Cached` and loads
no model; a changed photo is redone alone, in every stage. Any one stage also runs alone, reading
what the stages before it left in the workspace (`prepare_stage`).

    likeness prepare --profile demo-cpu              # the whole flow
    likeness stage masks --profile demo-cpu          # one stage
    python -m likeness.flows.prepare PROFILE         # the same as `likeness prepare`
"""

from __future__ import annotations

import sys
from typing import Literal

from prefect import flow

from likeness.settings import Settings
from likeness.stages import PREVIOUS, StageResult, upstream
from likeness.tasks.balance import balance_concepts
from likeness.tasks.captions import write_captions
from likeness.tasks.common import fails_cleanly, run_stage, workers
from likeness.tasks.generate import generate_regularization
from likeness.tasks.latents import cache_latents
from likeness.tasks.manifest import write_manifest
from likeness.tasks.masks import compute_masks
from likeness.tasks.resize import resize_images
from likeness.tasks.scan import scan_images
from likeness.workspace import Workspace

StageName = Literal["generate", "scan", "resize", "masks", "captions", "balance", "manifest", "latents"]


def generate(s: Settings, ws: Workspace) -> StageResult:
    return run_stage(generate_regularization, s, ws, settings=s)


def scan(s: Settings, ws: Workspace) -> StageResult:
    return run_stage(scan_images, s, ws, concepts=s.concepts, min_side=s.resize.min_side, workers=workers(s))


def resize(s: Settings, ws: Workspace, scan: StageResult) -> StageResult:
    return run_stage(resize_images, s, ws, scan=scan, resize=s.resize, workers=workers(s))


def masks(s: Settings, ws: Workspace, resize: StageResult) -> StageResult:
    return run_stage(compute_masks, s, ws, resize=resize, masks=s.masks, concepts=s.concepts, device=s.run.device)


def captions(s: Settings, ws: Workspace, resize: StageResult) -> StageResult:
    return run_stage(write_captions, s, ws, resize=resize, concepts=s.concepts, captioner=s.captioner,
                     seed=s.run.seed, device=s.run.device)


def balance(s: Settings, ws: Workspace, resize: StageResult) -> StageResult:
    return run_stage(balance_concepts, s, ws, resize=resize, concepts=s.concepts, training=s.training,
                     class_prior_images=s.evaluation.class_prior_images)


def manifest(s: Settings, ws: Workspace, resize: StageResult, masks: StageResult, captions: StageResult,
             balance: StageResult) -> StageResult:
    return run_stage(write_manifest, s, ws, resize=resize, masks=masks, captions=captions, balance=balance,
                     concepts=s.concepts)


def latents(s: Settings, ws: Workspace, manifest: StageResult) -> StageResult:
    return run_stage(cache_latents, s, ws, manifest=manifest, settings=s, device=s.run.device)


STAGES = {"generate": generate, "scan": scan, "resize": resize, "masks": masks, "captions": captions, "balance": balance,
          "manifest": manifest, "latents": latents}


@flow(name="prepare", log_prints=True)
@fails_cleanly
def prepare(settings: Settings) -> dict[str, StageResult]:
    """Generate regularization images, scan, resize, mask, caption, balance, write the manifest and cache the latents."""
    ws = Workspace.from_settings(settings)
    done: dict[str, StageResult] = {}
    if any(c.enabled and c.generate for c in settings.concepts):  # class images from the base model, for the scan
        done["generate"] = generate(settings, ws)
    done["scan"] = scan(settings, ws)  # errors in the dataset stop the flow here, before heavy work
    done["resize"] = resize(settings, ws, done["scan"])
    done["masks"] = masks(settings, ws, done["resize"])
    done["captions"] = captions(settings, ws, done["resize"])
    done["balance"] = balance(settings, ws, done["resize"])
    done["manifest"] = manifest(settings, ws, done["resize"], done["masks"], done["captions"], done["balance"])
    done["latents"] = latents(settings, ws, done["manifest"])
    return done


@flow(name="prepare-stage", log_prints=True)
@fails_cleanly
def prepare_stage(settings: Settings, stage: StageName) -> StageResult:
    """Run one prepare stage alone on what the earlier stages left in the workspace."""
    ws = Workspace.from_settings(settings)
    inputs = [upstream(ws, earlier, reader=stage) for earlier in PREVIOUS[stage]]
    return STAGES[stage](settings, ws, *inputs)


if __name__ == "__main__":
    from likeness.profiles import load_profile

    for result in prepare(load_profile(sys.argv[1] if len(sys.argv) > 1 else "demo-cpu", sys.argv[2:])).values():
        print(result.summary())
