"""The latent cache's index and entries as training and evaluation read them: `workspace/latents.csv`
and the `cache/latents`, `cache/text` safetensors files the latents stage (tasks/latents.py) writes.
The formats are described in that stage's docstring. `latent_path` and `text_path` are stored relative
to the workspace (`{workspace}/cache/...`); `read_latents_index` gives them absolute.

    latents, masks = load_latents(batch["latent_path"])      # for training: (B, 4, h, w), (B, 1, h, w)
    cached = load_text_outputs(batch["text_path"])           # {"text_encoder_2": EncoderOutput, ...}
    rows = epoch_rows(read_latents_index(ws.latents_index, ws), epoch)  # one row per id for this epoch
    add_time_ids = index_time_ids(rows.loc[ids])                     # (B, 6)
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from likeness.settings import Settings
from likeness.workspace import Workspace

if TYPE_CHECKING:  # torch is imported where tensors are read: a cached run reads only the settings helpers
    import torch

    from likeness.models.conditioning import EncoderOutput
INDEX_COLUMNS = ["id", "variation", "caption", "latent_path", "text_path", "image_variation", "bucket",
                 "original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"]
TIME_ID_COLUMNS = ["original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"]
ENCODERS = {  # settings part -> (model subfolder, tokenizer subfolder, tensor name prefix)
    "text_encoder": ("text_encoder", "tokenizer", "text_encoder"),
    "text_encoder_2": ("text_encoder_2", "tokenizer_2", "text_encoder_2"),
}


def load_latents(paths: list[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents (B, 4, H/8, W/8) and masks (B, 1, H/8, W/8), all ones where an image has none."""
    import torch
    from safetensors.torch import load_file

    entries = [load_file(str(p)) for p in paths]
    latents = torch.stack([e["latent"] for e in entries])
    masks = torch.stack([e.get("mask", torch.ones(1, *e["latent"].shape[-2:])) for e in entries])
    return latents, masks


def load_text_outputs(paths: list[str | Path]) -> dict[str, EncoderOutput]:
    """Cached text-encoder outputs by part, batched, as `conditioning.encode_prompt(cached_*=...)` takes them."""
    import torch
    from safetensors.torch import load_file

    from likeness.models.conditioning import EncoderOutput

    entries = [load_file(str(p)) for p in paths]
    found = {}
    for part in ENCODERS:
        if f"{part}_hidden" in entries[0]:
            pooled = [e[f"{part}_pooled"] for e in entries] if f"{part}_pooled" in entries[0] else None
            found[part] = EncoderOutput(torch.stack([e[f"{part}_hidden"] for e in entries]),  # (B, 77, W)
                                        None if pooled is None else torch.stack(pooled))  # (B, P)
    return found


def read_latents_index(path: str | Path, ws: Workspace | None = None) -> pd.DataFrame:
    """`latents.csv` as written by the stage (captions and paths as text, empty text_path = none), its
    paths absolute in `ws` (default: the index's folder, the workspace root)."""
    ws = ws or Workspace(Path(path).parent)
    df = pd.read_csv(path, keep_default_na=False, dtype={"id": str, "caption": str, "latent_path": str,
                                                         "text_path": str, "bucket": str})
    missing = sorted(set(INDEX_COLUMNS) - set(df.columns))
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (written by an older version); run the latents stage again")
    for column in ("latent_path", "text_path"):
        df[column] = df[column].map(lambda p: str(ws.absolute(p)) if p else p)
    return df


def epoch_rows(index: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """One row per id for `epoch`: image variation epoch % its image variations, text variation
    epoch % its text variations (OneTrainer's cycling); indexed by id."""
    by_id = index.groupby("id")
    image = epoch % (by_id["image_variation"].transform("max") + 1)
    text = epoch % (by_id["variation"].transform("max") + 1)
    return index[(index["image_variation"] == image) & (index["variation"] == text)].set_index("id", drop=False)


def index_time_ids(rows: pd.DataFrame, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 6) SDXL time ids of latents.csv rows: original (h, w), crop (top, left), target (h, w); float32 by default."""
    import torch

    from likeness.models.conditioning import time_ids

    sizes = torch.as_tensor(rows[TIME_ID_COLUMNS].to_numpy(dtype=np.int64))  # (B, 6)
    return time_ids(sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6], dtype=dtype or torch.float32)


def settings_family(settings: Settings) -> str:
    """"sdxl" or "sd15": settings.model.model_type, detected from the base model when "auto"."""
    if settings.model.model_type != "auto":
        return settings.model.model_type
    from likeness.models.loading import resolve_family

    return resolve_family("auto", settings.model.base_model, settings.model.config)


def model_parts(settings: Settings) -> list[str]:
    """The text encoders the model has: SD 1.5 has one (text_encoder_2 settings are ignored)."""
    return ["text_encoder"] if settings_family(settings) == "sd15" else list(ENCODERS)


def frozen_encoders(settings: Settings) -> list[str]:
    return [part for part in model_parts(settings) if not getattr(settings.training, part).train]
