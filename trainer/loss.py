"""The training loss: MSE/MAE/log-cosh, masked training, per-concept and per-timestep weights.

Per element the strengths of the three losses are summed; masked training multiplies by
clamp(mask, unmasked_weight, 1) (optionally divided by that weight's per-sample mean); then each
sample's mean is multiplied by its concept's loss_weight and by the timestep weight. Unlike
OneTrainer for SDXL, `unmasked_probability` really applies: with that probability a sample's mask
becomes all ones.

    losses = diffusion_losses(prediction, batch.target, batch.timesteps, scheduler.alphas_cumprod,
                              settings.training.loss, settings.training.masked_training,
                              mask=latent_masks, loss_weight=concept_weights,
                              v_prediction=batch.prediction_type == "v_prediction", generator=generator)
    losses.mean().backward()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from likeness.settings import LossSettings, MaskedTrainingSettings
from likeness.trainer.noise import snr


def log_cosh(diff: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) = x + softplus(-2x) - log 2, stable for large |x|."""
    return diff + F.softplus(-2.0 * diff) - math.log(2.0)


def element_losses(predicted: torch.Tensor, target: torch.Tensor, loss: LossSettings) -> torch.Tensor:
    """Per-element loss (B, C, h, w) in float32: the strength-weighted sum of MSE, MAE and log-cosh."""
    diff = predicted.float() - target.float()
    total = torch.zeros_like(diff)
    if loss.mse_strength:
        total = total + loss.mse_strength * diff.square()
    if loss.mae_strength:
        total = total + loss.mae_strength * diff.abs()
    if loss.log_cosh_strength:
        total = total + loss.log_cosh_strength * log_cosh(diff)
    return total


def mask_weights(mask: torch.Tensor, masked: MaskedTrainingSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """clamp(mask, unmasked_weight, 1), with each sample's mask all ones with probability unmasked_probability.

    `mask` is (B, 1, h, w) (or (B, C, h, w)) in [0, 1], soft masks allowed; the result has its shape.
    """
    mask = mask.float()
    if masked.unmasked_probability > 0:
        device = generator.device if generator is not None else mask.device
        ignore = torch.rand(mask.shape[0], generator=generator, device=device) < masked.unmasked_probability  # (B,)
        mask = torch.where(ignore.to(mask.device).view(-1, *[1] * (mask.ndim - 1)), torch.ones_like(mask), mask)
    return mask.clamp(masked.unmasked_weight, 1.0)


def timestep_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, loss: LossSettings, v_prediction: bool = False,
) -> torch.Tensor:
    """(B,) weight of each sample's loss from its timestep's SNR, as OneTrainer's loss_weight_fn.

    MIN_SNR_GAMMA min(snr, g)/snr, v-prediction min(snr, g)/(snr + 1) (Hang et al. 2023);
    DEBIASED_ESTIMATION 1/sqrt(min(snr, 1000)), v-prediction 1/sqrt(min(snr, 1000) + 1)
    (Yu et al. 2023, clipped as Kohya); P2 (1 + snr)^-g, v-prediction (2 + snr)^-g (Choi et al. 2022).
    """
    fn, gamma = loss.weight_fn, loss.weight_strength
    if fn == "CONSTANT":
        return torch.ones(timesteps.shape, device=timesteps.device)
    ratio = snr(alphas_cumprod, timesteps)  # (B,)
    extra = 1.0 if v_prediction else 0.0
    if fn == "MIN_SNR_GAMMA":
        return ratio.clamp(max=gamma) / (ratio + extra)
    if fn == "DEBIASED_ESTIMATION":
        return (ratio.clamp(max=1000.0) + extra).rsqrt()
    if fn == "P2":
        return (1.0 + ratio + extra) ** -gamma
    raise ValueError(f"training.loss.weight_fn: unknown {fn!r}")


def diffusion_losses(
    predicted: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    loss: LossSettings,
    masked: MaskedTrainingSettings,
    *,
    mask: torch.Tensor | None = None,
    loss_weight: torch.Tensor | None = None,
    v_prediction: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) weighted loss of each sample; the training loss is its mean.

    Args:
        predicted, target: (B, 4, H/8, W/8) UNet output and its target.
        mask: (B, 1, H/8, W/8) latent-sized masks; None (or masked.enabled off) trains unmasked.
        loss_weight: (B,) the concept's loss_weight of each sample; None means 1.
        generator: draws which samples ignore their mask (unmasked_probability).
    """
    losses = element_losses(predicted, target, loss)  # (B, 4, h, w)
    if masked.enabled and mask is not None:
        if mask.shape[0] != losses.shape[0] or mask.shape[2:] != losses.shape[2:] or mask.shape[1] not in (1, losses.shape[1]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the prediction {tuple(losses.shape)}: expected (B, 1, h, w)")
        weights = mask_weights(mask, masked, generator)  # (B, 1, h, w)
        losses = losses * weights
        if masked.normalize_masked_area_loss:
            losses = losses / weights.mean(dim=tuple(range(1, weights.ndim)), keepdim=True)
    per_sample = losses.mean(dim=tuple(range(1, losses.ndim)))  # (B,)
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample)
    return per_sample * timestep_weights(timesteps, alphas_cumprod, loss, v_prediction).to(per_sample)
