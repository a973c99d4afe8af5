"""THE training step at full SDXL size on a GPU: it/s, images/s, MFU and peak memory per variant.

What is timed is the loop's own step, `Trainer.forward_backward` + `Trainer.optimizer_step`
(`Trainer.step_only`, the parts placed by the loop's `place_models`), with the reference settings:
UNet + text encoder 1 trained in bf16, text encoder 2 frozen (its outputs cached, the part kept on
the host by training.offload_frozen, as the VAE), Adafactor with stochastic rounding and the
fused back pass, gradient checkpointing, masked loss, batch 1 at 1024 px (latents (1, 4, 128, 128)).
The models are a full-size SDXL with random weights built on the device (bench/random_sdxl.py: no
download). Variants change one setting each, in one process:

    python bench/gpu_step.py                       # CUDA; all variants, ~3-5 min on one H100/H200
    python bench/gpu_step.py --variants reference,compile --steps 20
    python bench/gpu_step.py --tiny                # the tests' tiny SDXL on the CPU: checks the script

MFU = FLOPs of one step (torch.utils.flop_counter.FlopCounterMode on the same step, eager, with
checkpointing off so recomputation is not counted: the model's FLOPs) x it/s / the device's dense
bf16 peak (H100/H200 SXM: 989 TFLOP/s; `--peak-tflops` for others). Memory: the peak allocated and
reserved by torch's CUDA allocator over the timed steps.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when run from elsewhere

from random_sdxl import build_random_sdxl, random_batch, reference_settings, step_trainer  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
VARIANTS = {  # name -> settings sections over the reference run's; compiled ones last (compiling is in place)
    "reference": {},
    "checkpointing off": {"training": {"gradient_checkpointing": False}},
    "fused back pass off": {"optimizer": {"fused_back_pass": False}},
    "factor_conv matrix": {"optimizer": {"adafactor": {"factor_conv": "matrix"}}},
    "nonfinite check per step": {"training": {"nonfinite_check": "step"}},  # vs one host sync per parameter
    "compile": {"training": {"compile": True}},
}


def step_flops(pipe, batch, device: torch.device) -> int:
    """FLOPs of one step of the reference run, counted on the step itself (eager, no checkpointing)."""
    from torch.utils.flop_counter import FlopCounterMode

    t = step_trainer(pipe, reference_settings(device.type, training={"gradient_checkpointing": False}), device)
    with FlopCounterMode(display=False) as counter:
        t.optimizer_step(t.forward_backward(batch, 0))
    release(t)
    return counter.get_total_flops()


def release(t) -> None:
    """Drop a variant's optimizer: its fused-back-pass hooks would step it in the next backward."""
    if t.fused is not None:
        t.fused.remove()
    t.optimizer.zero_grad(set_to_none=True)
    t.optimizer.state.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(pipe, batch, device: torch.device, sections: dict, steps: int, warmup: int) -> dict:
    t = step_trainer(pipe, reference_settings(device.type, **sections), device)
    for step in range(warmup):  # the first steps create the optimizer state (and compile)
        t.optimizer_step(t.forward_backward(batch, step))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        t.optimizer_step(t.forward_backward(batch, step))
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    row = {"it/s": 1 / seconds, "images/s": batch.latents.shape[0] / seconds, "allocated": 0.0, "reserved": 0.0}
    if device.type == "cuda":
        row["allocated"] = torch.cuda.max_memory_allocated(device) / 1024**3
        row["reserved"] = torch.cuda.max_memory_reserved(device) / 1024**3
    release(t)
    return row


def quiet() -> None:
    """No library warnings or bars in our table (diffusers' and dynamo's notes while tracing)."""
    import logging
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (state creation, compiling)")
    parser.add_argument("--resolution", type=int, help="px (default 1024; 64 with --tiny)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads with --tiny")
    parser.add_argument("--compile-backend", help="torch.compile backend of the compile variant (default: inductor; "
                        "eager with --tiny: inductor compiles for minutes on a small CPU)")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("no CUDA device: run with --tiny to check the script on the CPU")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    resolution = args.resolution or (64 if args.tiny else 1024)
    VARIANTS["compile"]["training"]["compile_backend"] = args.compile_backend or ("eager" if args.tiny else "inductor")
    quiet()
    started = time.perf_counter()
    pipe = build_random_sdxl(device, tiny=args.tiny)
    batch = random_batch(pipe, resolution, device)
    flops = step_flops(pipe, batch, device)
    peak = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e9
    print(f"{'tiny' if args.tiny else 'full-size'} SDXL ({unet:.3f} B UNet parameters, random) on {where}, "
          f"{resolution} px, batch 1; {flops / 1e12:.4g} TFLOPs per step (FlopCounterMode); "
          f"bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; built in {time.perf_counter() - started:.0f} s")
    print(f"  {'variant':<22} {'it/s':>7} {'images/s':>9} {'MFU':>7} {'peak alloc':>11} {'reserved':>9}  (GiB)")
    for name in args.variants.split(","):
        row = time_variant(pipe, batch, device, VARIANTS[name], args.steps, args.warmup)
        mfu = f"{flops * row['it/s'] / (peak * 1e12) * 100:6.1f}%" if peak else "    n/a"
        print(f"  {name:<22} {row['it/s']:7.2f} {row['images/s']:9.2f} {mfu} {row['allocated']:11.2f} "
              f"{row['reserved']:9.2f}", flush=True)
    print(f"  total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
