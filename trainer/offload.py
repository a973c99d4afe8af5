"""Where each model part lives during training: the parts whose outputs are cached stay on the CPU.

A frozen text encoder's outputs and the VAE's latents come from the latent cache, so training
steps never run them; with `training.offload_frozen` (default on, OneTrainer's "temp device") they
stay in host memory and visit the training device only to sample or evaluate. Full-size SDXL:
text encoder 2 (1.39 GB in bf16) and the fp32 VAE (0.33 GB) leave the GPU.

    parts = offloaded_parts(settings)                  # ["vae", "text_encoder_2"] for the reference run
    with on_device(pipe, parts, device):               # sampling needs every part on the device
        images = generate(pipe, ...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from likeness.latent_index import frozen_encoders
from likeness.settings import Settings

HOST = torch.device("cpu")


def offloaded_parts(settings: Settings) -> list[str]:
    """The parts that stay on the CPU during training steps (none with offload_frozen off)."""
    if not settings.training.offload_frozen:
        return []
    return ["vae", *frozen_encoders(settings)]


def move(module: torch.nn.Module, device: torch.device) -> None:
    # torch's own `to`: diffusers' override warns about fp32-only modules that SDXL does not have.
    torch.nn.Module.to(module, device)


@contextmanager
def on_device(pipe: Any, parts: Sequence[str], device: torch.device) -> Iterator[None]:
    """`parts` of `pipe` on `device` for the block, back on the CPU after it (also after an error)."""
    if device == HOST or not parts:
        yield
        return
    for part in parts:
        move(getattr(pipe, part), device)
    try:
        yield
    finally:
        for part in parts:
            move(getattr(pipe, part), HOST)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the freed blocks go back, so the steps' peak stays what it was
