"""What identifies a training run, without torch: a cached run computes only this.

The fingerprint (the settings and data the steps depend on, the base model) is what a backup must
match to be resumed or extended; the run's length (`run_length`) is kept apart from it so that a
finished run can be extended (`likeness.trainer.extend`); `train_key` is the training stage's cache
key. `check_prepared` says which prepare output training would miss.
"""

from __future__ import annotations

from typing import Any

from likeness.content import digest_parts, file_digest, model_fingerprint
from likeness.latent_index import model_parts, settings_family
from likeness.settings import Settings
from likeness.stages import PrepareError
from likeness.workspace import Workspace

TRAIN_VERSION = 2  # 2: the run's length left out of the fingerprint (trainer/extend.py)
RUN_PREPARE = "run `likeness prepare --profile <profile>` first"


class TrainDataError(PrepareError):
    """What training reads from prepare is missing or stale: run prepare again (the message says how)."""


def check_prepared(ws: Workspace) -> None:
    """Raise TrainDataError naming the prepare stage whose output is missing."""
    for stage, path in (("manifest", ws.manifest), ("latents", ws.latents_index)):
        if not path.is_file():
            raise TrainDataError(f"training needs the output of the prepare stage '{stage}' ({path}), "
                                 f"which does not exist: {RUN_PREPARE}")


def training_relevant(settings: Settings) -> dict[str, Any]:
    """The settings that change the weights of the steps trained (not sampling, saving, backups or run
    mechanics, nor the run's length: `extend.run_length`). SD 1.5 ignores the text_encoder_2 settings."""
    relevant = settings.model_dump(mode="json", include={"model", "concepts", "training", "optimizer", "schedule"})
    training = relevant["training"]
    sd15_unused = ["text_encoder_2"] if settings_family(settings) == "sd15" else []
    for name in ("iterations_per_second", "max_nonfinite_steps", "nonfinite_check", "epochs", *sd15_unused,  # not what is trained
                 "offload_frozen", "compile", "compile_backend", "read_loss_every"):       # run mechanics
        training.pop(name)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if part in training:
            training[part].pop("stop_training_after")  # the unit stays: it decides what the count means
    for concept in relevant["concepts"]:  # where the photos lie is not what is trained: the manifest has their content
        concept.pop("path")
        concept["caption"].pop("path")
    relevant["model"].pop("base_model")  # keyed by its content (training_fingerprint)
    relevant["seed"] = settings.run.seed
    relevant["class_prior_images"] = settings.evaluation.class_prior_images  # which images are held out
    return relevant


def training_fingerprint(settings: Settings, ws: Workspace) -> str:
    """What a backup must match to be resumed or extended: training settings, the data read, the base model."""
    index = ws.hashes()
    base = model_fingerprint(settings.model.base_model, index)
    index.save()  # a multi-GB base model is hashed once, then known by its size and mtime
    return digest_parts("train", TRAIN_VERSION, training_relevant(settings), file_digest(ws.manifest),
                        file_digest(ws.latents_index), base)


def train_key(settings: Settings, ws: Workspace) -> str:
    """Cache key of the whole training stage: the fingerprint plus what decides the outputs written."""
    outputs = settings.model_dump(mode="json", include={"sampling", "saving"})
    if settings.evaluation.during_training.enabled:  # evaluations and early stop change what is written
        outputs["evaluation"] = settings.evaluation.model_dump(mode="json", exclude={"selection"})
        outputs["fidelity_tolerance"] = settings.evaluation.selection.fidelity_tolerance
    return digest_parts("train-stage", training_fingerprint(settings, ws), run_length(settings), outputs)


def settings_hash(settings: Settings) -> str:
    return digest_parts(settings.model_dump(mode="json"))[:16]


def stopping_parts(settings: Settings) -> dict[str, Any]:
    """Each part of the model with a stop (unit EPOCH or STEP) -> its stop_training_after count."""
    training = settings.training
    return {part: getattr(training, part).stop_training_after for part in ("unet", *model_parts(settings))
            if getattr(training, part).stop_training_after_unit != "NEVER"}


def run_length(settings: Settings) -> dict[str, Any]:
    """How long the run is, as opposed to what its steps do (that is the fingerprint)."""
    return {"epochs": settings.training.epochs, "stop": stopping_parts(settings)}
