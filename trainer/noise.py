"""Noise, timesteps and targets of one training step: the DDPM forward process, as OneTrainer does it.

One generator per step, seeded with `global_step * world_size + rank`, draws the noise first and
the timesteps second, so a resumed run (or another process) draws exactly what it should.

    scheduler = training_scheduler(pipeline.scheduler.config)  # DDPM maths for any SDXL scheduler
    generator = step_generator(global_step, world_size, rank, device)
    batch = add_noise(latents, scheduler, settings.training.noise, generator)
    prediction = unet(batch.noisy_latents, batch.timesteps, ...).sample  # compare with batch.target
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from likeness.settings import NoiseSettings


@dataclass
class NoisyBatch:
    noisy_latents: torch.Tensor  # (B, 4, H/8, W/8)
    target: torch.Tensor  # (B, 4, H/8, W/8): the noise (epsilon) or the velocity (v-prediction)
    timesteps: torch.Tensor  # (B,) long
    prediction_type: str


def training_scheduler(scheduler_config: Any) -> DDPMScheduler:
    """A DDPM scheduler with the base model's noise schedule (beta schedule, prediction type, ...).

    The SDXL pipeline ships an Euler scheduler whose `add_noise` uses sigmas; training uses the
    DDPM form sqrt(a)*x0 + sqrt(1-a)*eps that the UNet was trained with.
    """
    return DDPMScheduler.from_config(scheduler_config)


def step_generator(global_step: int, world_size: int = 1, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The random source of one optimizer step on one process."""
    return torch.Generator(device=device).manual_seed(global_step * world_size + rank)


def timestep_range(noise: NoiseSettings, num_train_timesteps: int) -> tuple[int, int]:
    """[int(T*min_noising_strength), int(T*max_noising_strength)): timesteps a step may draw."""
    low, high = int(num_train_timesteps * noise.min_noising_strength), int(num_train_timesteps * noise.max_noising_strength)
    if high <= low:
        raise ValueError(
            f"training.noise: min_noising_strength {noise.min_noising_strength} and max_noising_strength "
            f"{noise.max_noising_strength} leave no whole timestep out of {num_train_timesteps}; widen the range"
        )
    return low, high


def sample_timesteps(batch_size: int, noise: NoiseSettings, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) long timesteps in `timestep_range`, drawn from `noise.timestep_distribution`.

    Definitions follow OneTrainer (timestep shift 1), after Esser et al. 2024 (SD3): LOGIT_NORMAL is
    sigmoid(N(noising_bias, noising_weight + 1)); HEAVY_TAIL maps u ~ U(0, 1) to
    1 - u - w(cos^2(pi u / 2) - 1 + u); SIGMOID and COS_MAP weight the discrete timesteps by
    sigmoid(w (x - (noising_bias + 0.5))) and 2 / (pi - 2 pi x + 2 pi x^2), x in [0, 1].
    """
    low, high = timestep_range(noise, num_train_timesteps)
    kind, device = noise.timestep_distribution, generator.device
    if kind == "UNIFORM":
        return torch.randint(low, high, (batch_size,), generator=generator, device=device)
    if kind in ("LOGIT_NORMAL", "HEAVY_TAIL"):
        if kind == "LOGIT_NORMAL":
            fraction = torch.normal(noise.noising_bias, noise.noising_weight + 1.0, (batch_size,), generator=generator, device=device).sigmoid()
        else:
            u = torch.rand(batch_size, generator=generator, device=device)
            fraction = 1.0 - u - noise.noising_weight * (torch.cos(math.pi / 2.0 * u) ** 2 - 1.0 + u)
        return (low + fraction * (high - low)).long().clamp(low, high - 1)
    x = torch.linspace(0, 1, high - low, device=device)
    if kind == "SIGMOID":
        weights = torch.sigmoid(noise.noising_weight * (x - (noise.noising_bias + 0.5)))
    else:  # COS_MAP
        weights = 2.0 / (math.pi - 2.0 * math.pi * x + 2.0 * math.pi * x**2)
    return low + torch.multinomial(weights, batch_size, replacement=True, generator=generator)


def sample_noise(latents: torch.Tensor, noise: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, 1) plus offset noise (one value per (batch, channel)) plus perturbation noise.

    Offset noise: Guttenberg 2023 "Diffusion with offset noise". Perturbation noise goes into the
    noise itself, so into the noisy input and the epsilon target alike (as OneTrainer).
    """
    shape, device = latents.shape, generator.device
    eps = torch.randn(shape, generator=generator, device=device)  # (B, 4, h, w)
    if noise.offset_noise_weight > 0:
        offset = torch.randn((shape[0], shape[1], *[1] * (len(shape) - 2)), generator=generator, device=device)
        eps = eps + noise.offset_noise_weight * offset  # (B, 4, 1, 1) broadcast
    if noise.perturbation_noise_weight > 0:
        eps = eps + noise.perturbation_noise_weight * torch.randn(shape, generator=generator, device=device)
    return eps.to(device=latents.device, dtype=latents.dtype)


def resolve_prediction_type(noise: NoiseSettings, scheduler: DDPMScheduler) -> str:
    """'epsilon' or 'v_prediction': forced by the settings, or as the base model's scheduler says."""
    kind = scheduler.config.prediction_type if noise.prediction_type == "auto" else noise.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"the base model's scheduler predicts {kind!r}; only epsilon and v_prediction are supported: "
            "set training.noise.prediction_type"
        )
    return kind


def add_noise(latents: torch.Tensor, scheduler: DDPMScheduler, noise: NoiseSettings, generator: torch.Generator) -> NoisyBatch:
    """Noisy latents and the UNet's target for scaled latents (B, 4, H/8, W/8) at random timesteps."""
    eps = sample_noise(latents, noise, generator)
    timesteps = sample_timesteps(latents.shape[0], noise, scheduler.config.num_train_timesteps, generator).to(latents.device)
    kind = resolve_prediction_type(noise, scheduler)
    noisy = scheduler.add_noise(latents, eps, timesteps)
    target = eps if kind == "epsilon" else scheduler.get_velocity(latents, eps, timesteps)
    return NoisyBatch(noisy_latents=noisy, target=target, timesteps=timesteps, prediction_type=kind)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a/(1-a) of each timestep, (B,) float32."""
    alpha = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha / (1.0 - alpha)
