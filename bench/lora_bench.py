"""Benchmark of LoRA extraction (issue 16): time, peak RAM and file size for a full-size SDXL pair,
and the reconstruction error by rank. Random weights, no download. A script that prints figures.

    python bench/lora_bench.py --tiny                 # tiny SDXL-shaped pair: checks the script (seconds)
    python bench/lora_bench.py --ranks 8 32 128 --threads 1   # full size (~11 GB RAM to build the pair)

The pair: the real SDXL UNet and CLIP ViT-L text encoder configs (bench/gpu_step.py), built on the
meta device and filled in bf16 from seeded generators; "tuned" = base + N(0, 1e-3) on every linear
and convolution weight, so each difference is full-rank noise. That is the worst case for a LoRA
(a flat spectrum: error ~ sqrt(1 - R / min(out, in))); a real fine-tune's difference concentrates in
few directions. Only the UNet and text encoder 1 are written (the extraction reads nothing else).
Each extraction runs in a child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_step.py's real SDXL configs

NOISE = 1e-3


def build_pair(folder: Path, tiny: bool) -> tuple[Path, Path]:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from gpu_step import CLIP_L, SDXL_UNET, TINY_CLIP, TINY_UNET
    from likeness.models.checkpoint import clip_l_to_original, unet_to_original

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L)))
    tensors = {}
    for seed, (name, module, convert) in enumerate((("unet", unet, lambda sd: unet_to_original(sd, unet.config)),
                                                    ("te1", text_encoder, clip_l_to_original))):
        state = {}
        for i, (key, t) in enumerate(module.state_dict().items()):  # meta tensors: shapes only
            g = torch.Generator().manual_seed(seed * 100_000 + i)
            state[key] = (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16) if t.is_floating_point() \
                else torch.zeros(t.shape, dtype=t.dtype)
        tensors |= convert(state)
        del module
    base, tuned = folder / "base.safetensors", folder / "tuned.safetensors"
    save_file(tensors, str(base))
    for i, (key, t) in enumerate(tensors.items()):
        if t.ndim in (2, 4):
            g = torch.Generator().manual_seed(10**7 + i)
            tensors[key] = (t.float() + torch.randn(t.shape, generator=g) * NOISE).to(torch.bfloat16)
    save_file(tensors, str(tuned))
    return base, tuned


def extract_child(base: Path, tuned: Path, out: Path, rank: int) -> dict:
    """Run one extraction in this process (the child) and report its figures as JSON."""
    from likeness.models.lora_extract import extract_lora

    report = extract_lora(tuned, base, out, rank=rank, dtype="bfloat16")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"rank": rank, "seconds": report.seconds, "peak_rss_gib": peak, "mib": report.bytes / 2**20,
            "error": {part: r.relative_error for part, r in report.parts.items()},
            "layers": {part: r.layers - r.unchanged for part, r in report.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the extraction (0: torch's default)")
    parser.add_argument("--child", nargs=4, metavar=("BASE", "TUNED", "OUT", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        base, tuned, out, rank = args.child
        print(json.dumps(extract_child(Path(base), Path(tuned), Path(out), int(rank))))
        return
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        started = time.perf_counter()
        base, tuned = build_pair(Path(tmp), args.tiny)
        print(f"pair built in {time.perf_counter() - started:.0f} s: {tuned.stat().st_size / 2**30:.2f} GiB each")
        print(f"{'rank':>5} {'time s':>7} {'peak RSS GiB':>12} {'file MiB':>9} {'UNet err':>9} {'TE1 err':>8} {'layers':>7}")
        for rank in args.ranks:
            out = Path(tmp) / f"lora-{rank}.safetensors"
            done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                                   "--child", str(base), str(tuned), str(out), str(rank)],
                                  check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{rank:>5} {r['seconds']:>7.1f} {r['peak_rss_gib']:>12.2f} {r['mib']:>9.1f} {r['error']['unet']:>9.4f} "
                  f"{r['error']['te1']:>8.4f} {sum(r['layers'].values()):>7}", flush=True)


if __name__ == "__main__":
    main()
