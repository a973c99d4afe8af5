"""Training batches from what prepare left in the workspace: the manifest and the latent/text caches.

Concepts become `ConceptItems` for the `EpochSampler` (balancing and strategy from the manifest);
validation concepts, disabled concepts and the held-out regularization images
(`holdout.heldout_ids`, kept for the class-prior loss) never enter a batch. Per batch:

    latents   (B, 4, H/8, W/8) float32, unscaled (the loop multiplies by vae.config.scaling_factor)
    masks     (B, 1, H/8, W/8) float32 in 0..1, all ones for images without a mask
    captions  the caption of this epoch's text variation (latents.epoch_rows: epoch mod variations,
              as the image variation)
    cached    frozen text encoders' outputs by part ({"text_encoder_2": EncoderOutput, ...})
    time_ids  (B, 6) SDXL micro-conditioning from latents.csv: original (h, w), crop (top, left),
              target (h, w) of the variation
    loss_weight (B,) each sample's concept loss_weight

With aspect-ratio buckets (resize.mode = "bucket") a batch holds images of one bucket only.

    data = TrainData(ws, settings, world_size=1, rank=0)
    for samples in data.sampler:                   # the rest of the current epoch
        batch = data.load(samples, epoch)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from likeness.holdout import heldout_ids
from likeness.latent_index import epoch_rows, index_time_ids, load_latents, load_text_outputs, model_parts, read_latents_index
from likeness.manifest import read_manifest
from likeness.models.conditioning import EncoderOutput
from likeness.settings import Settings
from likeness.trainer.epoch_sampler import ConceptItems, Sample, bucketed_sampler
from likeness.trainer.fingerprint import RUN_PREPARE, TrainDataError, check_prepared  # noqa: F401  (re-exported)
from likeness.workspace import Workspace


@dataclass
class Batch:
    ids: list[str]
    captions: list[str]
    latents: torch.Tensor  # (B, 4, H/8, W/8), unscaled
    masks: torch.Tensor  # (B, 1, H/8, W/8)
    cached: dict[str, EncoderOutput]
    time_ids: torch.Tensor  # (B, 6)
    loss_weight: torch.Tensor  # (B,)


def latents_index(path: Path) -> pd.DataFrame:
    try:
        return read_latents_index(path)
    except ValueError as exc:
        raise TrainDataError(f"{exc}; {RUN_PREPARE}") from None


def trainable_ids(manifest: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Manifest rows that may be trained on: enabled training concepts, minus the held-out images."""
    enabled = {c.name for c in settings.concepts if c.enabled and not c.validation}
    held = heldout_ids(manifest, settings.evaluation.class_prior_images)
    keep = manifest["concept"].isin(enabled) & ~manifest["validation"].astype(bool) & ~manifest["id"].isin(held)
    return manifest[keep].set_index("id", drop=False)


def concept_items(rows: pd.DataFrame) -> list[ConceptItems]:
    """One ConceptItems per trained concept, balancing as the balance stage resolved it."""
    concepts = [ConceptItems(name, group["id"].tolist(), float(group["balancing"].iloc[0]),
                             group["balancing_strategy"].iloc[0]) for name, group in rows.groupby("concept", sort=True)]
    if not concepts:
        raise TrainDataError("no trainable images in the manifest (all are validation, disabled or held out)")
    return concepts


class TrainData:
    """The epoch sampler of this process and the loader of its batches."""

    def __init__(self, ws: Workspace, settings: Settings, world_size: int = 1, rank: int = 0) -> None:
        check_prepared(ws)
        self.manifest = read_manifest(ws.manifest, ws)
        self.rows = trainable_ids(self.manifest, settings)  # indexed by id
        self.index = latents_index(ws.latents_index)
        missing = sorted(set(self.rows.index) - set(self.index["id"]))
        if missing:
            raise TrainDataError(f"{missing[:5]}: in the manifest but not in the latent cache index; {RUN_PREPARE}")
        self.concepts = concept_items(self.rows)
        self.frozen = [p for p in model_parts(settings) if not getattr(settings.training, p).train]
        buckets = self.index.drop_duplicates("id").set_index("id")["bucket"].to_dict()
        training = settings.training
        self.sampler = bucketed_sampler(self.concepts, buckets, training.batch_size, settings.run.seed, world_size,
                                        rank, training.gradient_accumulation_steps)
        self._epoch_rows: tuple[int, pd.DataFrame] | None = None

    def total_steps(self, epochs: int, accumulation: int) -> int:
        """Optimizer steps of the whole run (with buckets the batch count varies by epoch)."""
        if accumulation != self.sampler.accumulation:
            raise ValueError(f"accumulation {accumulation} differs from the sampler's {self.sampler.accumulation}")
        return self.sampler.total_steps(epochs)

    def epoch_rows(self, epoch: int) -> pd.DataFrame:
        """latents.csv rows of this epoch's image and text variation, one per id."""
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, epoch_rows(self.index, epoch))
        return self._epoch_rows[1]

    def load(self, samples: Sequence[Sample], epoch: int) -> Batch:
        ids = [s.item for s in samples]
        rows = self.epoch_rows(epoch).loc[ids]
        _check_files(rows["latent_path"].tolist())
        latents, masks = load_latents(rows["latent_path"].tolist())  # (B, 4, h, w), (B, 1, h, w)
        cached: dict[str, EncoderOutput] = {}
        if self.frozen:
            _check_files(rows["text_path"].tolist())
            cached = {p: out for p, out in load_text_outputs(rows["text_path"].tolist()).items() if p in self.frozen}
        return Batch(ids=ids, captions=rows["caption"].tolist(), latents=latents, masks=masks, cached=cached,
                     time_ids=index_time_ids(rows),  # (B, 6)
                     loss_weight=torch.tensor(self.rows.loc[ids, "loss_weight"].to_numpy(dtype="float32")))


def _check_files(paths: Sequence[str]) -> None:
    for path in paths:
        if not path or not Path(path).is_file():
            raise TrainDataError(f"cache file {path!r} is missing (the cache was cleared?); {RUN_PREPARE}")
