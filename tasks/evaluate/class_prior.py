"""Deterministic diffusion loss of a checkpoint on images it never trained on: the class-prior loss
(held-out regularization images) and the validation loss (a validation concept's images).

A model that forgets its class ("man") denoises unseen class images worse, so this loss rises
with overtraining. To compare checkpoints fairly every checkpoint sees exactly the same noisy
inputs: the noise of each image is drawn from a generator seeded by (evaluation seed, image id),
at `loss_timesteps` fixed, evenly spaced timesteps. The loss is the training loss
(`trainer/loss.py`, unmasked, concept weights 1) through the shared noise maths and conditioning.

Inputs come from the latent cache: VAE latents, and the outputs of the text encoders that were
frozen in training (TE2 by default). An encoder that was trained (TE1 by default) runs live with
the checkpoint's own weights.

    rows = loss_rows(read_manifest(ws.manifest, ws), read_latents_index(ws.latents_index, ws), "class_prior", 8)
    value = deterministic_loss(pipe, rows, settings)      # mean loss, a float; None without rows
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pandas as pd
import torch

from likeness.holdout import heldout_ids
from likeness.latent_index import TIME_ID_COLUMNS, load_latents, load_text_outputs
from likeness.models.checkpoint_sd15 import is_sd15_pipeline
from likeness.models.conditioning import encode_prompt, encode_prompt_sd15, time_ids
from likeness.settings import MaskedTrainingSettings, Settings
from likeness.trainer.loss import diffusion_losses
from likeness.trainer.noise import resolve_prediction_type, sample_noise, timestep_range, training_scheduler

LossKind = Literal["class_prior", "validation"]
UNMASKED = MaskedTrainingSettings(enabled=False)


def loss_rows(manifest: pd.DataFrame, latents_index: pd.DataFrame, kind: LossKind, held_out: int) -> list[dict]:
    """The images a loss is measured on, with their cached latent and text files (first text variation).

    class_prior: the held-out regularization images (`holdout.heldout_ids`); validation: the
    rows of validation concepts. Sorted by id, so the order never depends on the manifest's.
    """
    if kind == "class_prior":
        ids = heldout_ids(manifest, held_out)
    else:
        ids = set(manifest.loc[manifest["validation"].astype(bool), "id"])
    if not ids:
        return []
    first = latents_index[latents_index["variation"] == 0].set_index("id")
    missing = sorted(ids - set(first.index))
    if missing:
        raise ValueError(f"latents.csv has no cached latents for {missing[:3]}...: run `likeness prepare` again")
    # The time ids training used for this image (latents.csv: resize.pad_time_ids decides them in pad mode).
    return [{"id": i, "caption": first.at[i, "caption"], "latent_path": first.at[i, "latent_path"],
             "text_path": "" if pd.isna(first.at[i, "text_path"]) else str(first.at[i, "text_path"]),
             "time_ids": [int(first.at[i, column]) for column in TIME_ID_COLUMNS]}
            for i in sorted(ids)]


def fixed_timesteps(count: int, settings: Settings, num_train_timesteps: int) -> torch.Tensor:
    """(count,) long: the centres of `count` equal slices of the training timestep range."""
    low, high = timestep_range(settings.training.noise, num_train_timesteps)
    return torch.tensor([low + int((k + 0.5) * (high - low) / count) for k in range(count)], dtype=torch.long)


def noise_seed(seed: int, item_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def deterministic_loss(pipe: Any, rows: list[dict], settings: Settings) -> float | None:
    """Mean training loss of `pipe` over `rows` x the fixed timesteps; None when there are no rows."""
    if not rows:
        return None
    scheduler = training_scheduler(pipe.scheduler.config)
    timesteps = fixed_timesteps(settings.evaluation.loss_timesteps, settings, scheduler.config.num_train_timesteps)
    kind = resolve_prediction_type(settings.training.noise, scheduler)
    losses = [_image_loss(pipe, row, scheduler, timesteps, kind, settings) for row in rows]
    return float(torch.stack(losses).mean())


def _image_loss(pipe: Any, row: dict, scheduler, timesteps: torch.Tensor, kind: str, settings: Settings) -> torch.Tensor:
    unet, count = pipe.unet, len(timesteps)
    latents, _ = load_latents([row["latent_path"]])  # (1, 4, H/8, W/8), unscaled
    x0 = (latents * pipe.vae.config.scaling_factor).expand(count, -1, -1, -1)  # (K, 4, H/8, W/8)
    generator = torch.Generator("cpu").manual_seed(noise_seed(settings.evaluation.seed, row["id"]))
    eps = sample_noise(x0, settings.training.noise, generator)  # same noise for every checkpoint
    noisy = scheduler.add_noise(x0, eps, timesteps)
    target = eps if kind == "epsilon" else scheduler.get_velocity(x0, eps, timesteps)
    embeds, pooled = _conditioning(pipe, row, settings)  # (1, 77, W1 + W2), (1, P); SD 1.5: (1, 77, W), None
    dtype, device = unet.dtype, unet.device
    added = None  # SD 1.5: no pooled embeddings, no time ids
    if pooled is not None:
        sizes = row["time_ids"]
        ids = time_ids(sizes[0:2], sizes[2:4], sizes[4:6])  # (1, 6), as training conditioned this image
        added = {"text_embeds": pooled.expand(count, -1).to(device, dtype),
                 "time_ids": ids.expand(count, -1).to(device, dtype)}
    prediction = unet(noisy.to(device, dtype), timesteps.to(device),
                      encoder_hidden_states=embeds.expand(count, -1, -1).to(device, dtype),
                      added_cond_kwargs=added).sample  # (K, 4, H/8, W/8)
    losses = diffusion_losses(prediction.cpu(), target, timesteps, scheduler.alphas_cumprod,
                              settings.training.loss, UNMASKED, v_prediction=kind == "v_prediction")  # (K,)
    return losses.mean()


def _conditioning(pipe: Any, row: dict, settings: Settings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frozen encoders' outputs from the cache; trained encoders run live with the checkpoint's weights."""
    cached = load_text_outputs([row["text_path"]]) if row["text_path"] else {}
    training = settings.training
    first = cached.get("text_encoder") if not training.text_encoder.train else None
    if is_sd15_pipeline(pipe):
        embeds = encode_prompt_sd15(pipe.text_encoder, pipe.tokenizer, [row["caption"]],
                                    training.text_encoder.clip_skip, cached=first)  # (1, 77, W)
        return embeds.cpu(), None
    second = cached.get("text_encoder_2") if not training.text_encoder_2.train else None
    embeds, pooled = encode_prompt(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                                   [row["caption"]], training.text_encoder.clip_skip, training.text_encoder_2.clip_skip,
                                   cached_1=first, cached_2=second)
    return embeds.cpu(), pooled.cpu()
