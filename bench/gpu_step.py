"""One SDXL training step at full size on a GPU: it/s, peak VRAM and MFU, with random weights
(no download). The reference run's recipe: UNet + text encoder 1 trained, text encoder 2 frozen
(its outputs cached), bf16 weights and autocast, Adafactor with the fused back pass, gradient
checkpointing, batch 1 at 1024x1024 (latents (1, 4, 128, 128)).

    python bench/gpu_step.py                    # on a CUDA machine (needs torch, diffusers, transformers)
    python bench/gpu_step.py --tiny             # a tiny UNet on the CPU: checks the script itself

MFU = (20.2 TFLOPs per forward+backward of the SDXL UNet at 1024 px, counted with torch's
FlopCounterMode, reference/stack-notes.md) x it/s / the peak bf16 matmul rate (790 TFLOP/s measured
on H100/H200). Text encoder 1 and the recomputation of gradient checkpointing are not counted, so
this is the model FLOPs utilisation proper. Only `likeness.trainer.optimizer` (pure torch) is used
from this project, so the script runs where prefect and pandera are not installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

UNET_TFLOPS_PER_STEP = 20.2  # forward + backward, SDXL UNet, 1024 px, batch 1
PEAK_TFLOPS = 790.0

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, written out (no download)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# CLIP ViT-L/14 text tower (SDXL's text encoder 1); text encoder 2 (OpenCLIP bigG, 1280 wide) is frozen and cached
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TE2_WIDTH, POOLED = 1280, 1280

TINY_UNET = dict(
    sample_size=8, layers_per_block=1, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
    cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=32,
)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_TE2_WIDTH, TINY_POOLED = 32, 32


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET)).to(device, dtype)
    text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L))).to(device, dtype)
    unet.enable_gradient_checkpointing()
    (getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable)()
    unet.train()
    text_encoder.train()
    return unet, text_encoder


def make_step(unet, text_encoder, tiny: bool, device: torch.device, dtype: torch.dtype):
    """One step: TE1 live (trained) + cached TE2 outputs -> UNet -> MSE -> fused Adafactor backward."""
    from likeness.trainer.optimizer import FusedBackPass, build_optimizer
    from likeness.settings import Settings

    settings = Settings()  # the reference run: Adafactor, LRs 1e-5 / 3e-6, stochastic rounding
    optimizer = build_optimizer({"unet": unet.parameters(), "text_encoder": text_encoder.parameters()}, settings)
    FusedBackPass(optimizer)
    size, te2, pooled = (8, TINY_TE2_WIDTH, TINY_POOLED) if tiny else (128, TE2_WIDTH, POOLED)
    latents = torch.randn(1, 4, size, size, device=device)  # (1, 4, 128, 128) at 1024 px
    ids = torch.randint(0, text_encoder.config.vocab_size, (1, 77), device=device)
    cached_hidden = torch.randn(1, 77, te2, device=device, dtype=dtype)  # TE2 penultimate layer, cached
    cached_pooled = torch.randn(1, pooled, device=device, dtype=dtype)
    time_ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        with autocast:
            hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (1, 77, 768)
            embeds = torch.cat([hidden, cached_hidden.to(hidden.dtype)], dim=-1)  # (1, 77, 2048)
            noisy = latents + noise * (t.float() / 1000).view(-1, 1, 1, 1)
            predicted = unet(noisy.to(dtype), t, embeds.to(dtype),
                             added_cond_kwargs={"text_embeds": cached_pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(predicted.float(), noise)
        loss.backward()  # the optimizer steps inside, parameter by parameter
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet, fp32 on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads with --tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("no CUDA device: run with --tiny to check the script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    unet, text_encoder = build(args.tiny, device, dtype)
    step = make_step(unet, text_encoder, args.tiny, device, dtype)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    print(f"{'tiny UNet (CPU, fp32)' if args.tiny else 'SDXL UNet (' + torch.cuda.get_device_name() + ', bf16)'}: "
          f"{params:.3f} B parameters, median of {args.steps} steps after {args.warmup}")
    print(f"  {1 / median:.2f} it/s ({median * 1000:.1f} ms/step)")
    if cuda:
        print(f"  peak VRAM {torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 1024**3:.2f} GiB reserved")
        print(f"  MFU {UNET_TFLOPS_PER_STEP / median / PEAK_TFLOPS * 100:.1f} % "
              f"({UNET_TFLOPS_PER_STEP / median:.0f} TFLOP/s of {PEAK_TFLOPS:.0f})")


if __name__ == "__main__":
    main()
