"""Which regularization images are held out of training, so evaluation can measure class-prior loss.

A model that forgets its class ("man") gets worse at denoising class images it never saw. To
measure that honestly the images must never be trained on: the trainer drops them from the epoch
sampler and the evaluation scores them. The choice is deterministic and depends only on the image
ids, so prepare, train and evaluate agree without passing anything around: per regularization
concept, the `count` ids with the smallest SHA-256 of the id, never more than half the concept.

    held = heldout_ids(read_manifest(ws.manifest, ws), settings.evaluation.class_prior_images)

The balance stage takes them out before it counts samples, steps and `auto` balancing
(`heldout_of`), so its plan is what the trainer runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pandas as pd


def _rank(item_id: str) -> str:
    return hashlib.sha256(item_id.encode()).hexdigest()


def heldout_ids(manifest: pd.DataFrame, count: int) -> set[str]:
    """The ids of the held-out regularization images in a manifest (validation rows excluded)."""
    if count <= 0 or manifest.empty:
        return set()
    rows = manifest[(manifest["role"] == "regularization") & ~manifest["validation"].astype(bool)]
    return heldout_of({name: list(group["id"]) for name, group in rows.groupby("concept", sort=True)}, count)


def heldout_of(ids_by_concept: Mapping[str, Iterable[str]], count: int) -> set[str]:
    """The held-out ids, given each (non-validation) regularization concept's ids: before the manifest
    exists (the balance stage plans the epochs on what is left) and from it (training, evaluation)."""
    held: set[str] = set()
    if count <= 0:
        return held
    for ids in ids_by_concept.values():
        ranked = sorted(ids, key=_rank)
        held.update(ranked[: min(count, len(ranked) // 2)])
    return held
