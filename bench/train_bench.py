"""Benchmark of the training step (issue 4): our loop's step against a minimal hand-written
diffusers training step on the same tiny SDXL model and batch, and the peak memory (RSS).
A script that prints figures, not a test.

    .venv/bin/python bench/train_bench.py                        # 64 px, batch 1, 30 timed steps
    .venv/bin/python bench/train_bench.py --resolution 128 --batch 4 --steps 20 --threads 2

Our step is `Trainer.forward_backward` + `Trainer.optimizer_step` on a batch from the latent cache
(cached TE2 outputs, TE1 live and trained, our Adafactor with the fused back pass, masked loss).
The baseline is what a diffusers example script does by hand: the same batch tensors already in
memory, DDPM noise, both text encoders' prompt embeddings, UNet forward, MSE, backward,
transformers' Adafactor step. Timing: the median of `--steps` steps after `--warmup` steps.
Weights are random (tiny models), so the figures measure the plumbing's overhead, not a real model.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path


def prepared_settings(root: Path, resolution: int, batch: int):
    """Tiny models, a few real photos, and the prepare stages run as plain functions."""
    from PIL import Image
    from skimage import data

    from likeness.tasks.balance import balance_stage
    from likeness.tasks.captions import captions_stage
    from likeness.content import HashIndex
    from likeness.tasks.scan import scan_stage
    from likeness.tasks.latents import latents_stage
    from likeness.manifest import manifest_stage
    from likeness.tasks.masks import masks_stage
    from likeness.tasks.resize import resize_stage
    from likeness.settings import Settings
    from likeness.models.tiny import save_tiny_models
    from likeness.workspace import Workspace

    models = save_tiny_models(root / "models")
    photos = (data.astronaut, data.chelsea, data.coffee, data.rocket)
    for i in range(max(4, batch)):
        (root / "person").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[i % len(photos)]()).save(root / "person" / f"p{i}.png")
    fp32 = {"weight_dtype": "float32"}
    settings = Settings.model_validate({
        "run": {"workspace": str(root / "ws"), "device": "cpu", "workers": 1},
        "model": {"base_model": str(models.sdxl)},
        "concepts": [{"name": "person", "path": str(root / "person"), "caption": {"source": "text", "text": "ohwx man"}}],
        "resize": {"resolution": resolution, "min_side": 32}, "masks": {"model": str(models.clipseg)},
        "training": {"batch_size": batch, "train_dtype": "float32", "gradient_checkpointing": False,
                     "unet": fp32, "text_encoder": fp32, "text_encoder_2": fp32},
        "optimizer": {"stochastic_rounding": False}, "schedule": {"warmup_steps": 0},
    })
    ws, index = Workspace.from_settings(settings), HashIndex()
    scan, _ = scan_stage(settings.concepts, 32, ws, index)
    resize = resize_stage(scan, settings.resize, ws, index)
    masks = masks_stage(resize, settings.masks, settings.concepts, ws, index, device="cpu")
    captions = captions_stage(resize, settings.concepts, settings.captioner, 42, ws, index)
    balance, _ = balance_stage(resize, settings.concepts, settings.training, ws, index,
                               class_prior_images=settings.evaluation.class_prior_images)
    latents_stage(manifest_stage(resize, masks, captions, balance, settings.concepts, ws, index), settings, ws, index, "cpu")
    return settings


def timed(step, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(settings, warmup: int, steps: int) -> float:
    from likeness.trainer.loop import Processes, Trainer

    import torch

    t = Trainer(settings, Processes(1, 0, torch.device("cpu")), lambda m: None, ())
    batch = t.data.load(t.data.sampler.batches(0)[0], 0)

    def step(i: int) -> None:
        t.forward_backward(batch, i)
        t.optimizer_step()

    return timed(step, warmup, steps)


def baseline(settings, warmup: int, steps: int) -> float:
    """A training step written the way diffusers' example scripts write it."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from transformers.optimization import Adafactor

    from likeness.trainer.loop import Processes, Trainer

    t = Trainer(settings, Processes(1, 0, torch.device("cpu")), lambda m: None, ())  # only for the same batch
    batch = t.data.load(t.data.sampler.batches(0)[0], 0)
    pipe = StableDiffusionXLPipeline.from_pretrained(settings.model.base_model)
    pipe.text_encoder_2.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    optimizer = Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False, warmup_init=False,
                          weight_decay=0.01)
    latents = batch.latents * pipe.vae.config.scaling_factor  # (B, 4, H/8, W/8)

    def step(i: int) -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds, _, pooled, _ = pipe.encode_prompt(batch.captions, do_classifier_free_guidance=False)
        predicted = pipe.unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled,
                                                                          "time_ids": batch.time_ids.float()}).sample
        F.mse_loss(predicted, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, warmup, steps)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        settings = prepared_settings(Path(tmp), args.resolution, args.batch)
        rss_before = peak_rss_mib()
        ours_s = ours(settings, args.warmup, args.steps)
        rss_ours = peak_rss_mib()
        base_s = baseline(settings, args.warmup, args.steps)
    print(f"tiny SDXL, {args.resolution} px, batch {args.batch}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"  likeness loop step   {ours_s * 1000:8.1f} ms")
    print(f"  hand-written step    {base_s * 1000:8.1f} ms")
    print(f"  ratio (ours / hand)  {ours_s / base_s:8.2f}")
    print(f"  peak RSS: {rss_before:.0f} MiB after prepare, {rss_ours:.0f} MiB after our steps, "
          f"{peak_rss_mib():.0f} MiB at the end")


if __name__ == "__main__":
    main()
