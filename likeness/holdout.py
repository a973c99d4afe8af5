"""Which regularization images are held out of training, so evaluation can measure class-prior loss.

A model that forgets its class ("man") gets worse at denoising class images it never saw. To
measure that honestly the images must never be trained on: the trainer drops them from the epoch
sampler and the evaluation scores them. The choice is deterministic and depends only on the image
ids, so prepare, train and evaluate agree without passing anything around: per regularization
concept, the `count` ids with the smallest SHA-256 of the id, never more than half the concept.

    held = heldout_ids(read_manifest(ws.manifest), settings.evaluation.class_prior_images)
"""

from __future__ import annotations

import hashlib

import pandas as pd


def _rank(item_id: str) -> str:
    return hashlib.sha256(item_id.encode()).hexdigest()


def heldout_ids(manifest: pd.DataFrame, count: int) -> set[str]:
    """The ids of the held-out regularization images in a manifest (validation rows excluded)."""
    if count <= 0 or manifest.empty:
        return set()
    rows = manifest[(manifest["role"] == "regularization") & ~manifest["validation"].astype(bool)]
    held: set[str] = set()
    for _, group in rows.groupby("concept", sort=True):
        ids = sorted(group["id"], key=_rank)
        held.update(ids[: min(count, len(ids) // 2)])
    return held
