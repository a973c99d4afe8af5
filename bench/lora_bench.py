"""Benchmarks of LoRA (issue 16), with random weights and no download. A script that prints figures.

1. Extraction (default): time, peak RSS and file size for a full-size SDXL pair, and the
   reconstruction error by rank, with the default (randomized where the rank is small) method and,
   for `--exact-ranks`, the exact one beside it.
2. `--accuracy`: the randomized low-rank factors against the exact ones on single full-size layer
   shapes with three spectra (flat noise, power-law decay, rank 16 + noise): time and residual.
3. `--train`: a LoRA training step against the full fine-tune's on the tiny model (the loop's
   `forward_backward` + `optimizer_step`, each in its own process): median step time, peak live
   heap during the steps and peak RSS, side by side with the ratios.

    python bench/lora_bench.py --tiny                 # tiny SDXL-shaped pair: checks the script (seconds)
    flock /work/wt/bigram.lock /usr/bin/time -v python bench/lora_bench.py --ranks 8 32 128 --exact-ranks 32 --threads 1
                                                      # full size (~11 GB RAM to build the pair, ~10 GB disk)
    python bench/lora_bench.py --accuracy --threads 1 # a minute
    python bench/lora_bench.py --train --threads 1    # tiny model, 64 px, a minute

The pair: the real SDXL UNet and CLIP ViT-L text encoder configs (bench/random_sdxl.py), built on the
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_sdxl.py's real SDXL configs

NOISE = 1e-3


def build_pair(folder: Path, tiny: bool) -> tuple[Path, Path]:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from likeness.models.checkpoint import clip_l_to_original, unet_to_original
    from likeness.models.tiny import build_clip_tokenizer, build_unet, text_encoder_configs
    from random_sdxl import CLIP_L, SDXL_UNET

    if tiny:
        unet, text_encoder = build_unet(), CLIPTextModel(text_encoder_configs(*[build_clip_tokenizer()] * 2)[0])
    else:
        with torch.device("meta"):  # shapes only: filled below, one tensor at a time
            unet, text_encoder = UNet2DConditionModel(**SDXL_UNET), CLIPTextModel(CLIPTextConfig(**CLIP_L))
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


def extract_child(base: Path, tuned: Path, out: Path, rank: int, method: str) -> dict:
    """Run one extraction in this process (the child) and report its figures as JSON."""
    from host_memory import PeakLive
    from likeness.models.lora_extract import extract_lora

    with PeakLive(interval=0.01) as live:
        report = extract_lora(tuned, base, out, rank=rank, dtype="bfloat16", method=method)
    # RSS also counts the pages of the two memory-mapped weight files read so far (clean, file-backed:
    # the kernel drops them under pressure); the live heap is what the extraction itself holds.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"rank": rank, "method": method, "seconds": report.seconds, "peak_rss_gib": peak,
            "peak_live_gib": live.bytes / 2**30, "mib": report.bytes / 2**20,
            "error": {part: r.relative_error for part, r in report.parts.items()},
            "layers": {part: r.layers - r.unchanged for part, r in report.parts.items()}}


# --- accuracy of the randomized factors on single layers --------------------------------------

SHAPES = {"ff.proj (10240, 1280)": (10240, 1280), "attn2.to_k (1280, 2048)": (1280, 2048),
          "conv 3x3 (1280, 11520)": (1280, 11520), "attn1.to_q (640, 640)": (640, 640)}


def spectrum_matrix(shape: tuple[int, int], kind: str, g: torch.Generator) -> torch.Tensor:
    """A (out, in) difference with a known kind of spectrum, at a fine-tune's scale (~1e-3)."""
    noise = torch.randn(shape, generator=g) * 1e-3
    if kind == "flat noise":
        return noise
    n = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    if kind == "power law 1/i":
        s = 1e-1 / torch.arange(1, n + 1, dtype=torch.float32)
        return (u * s) @ v.T
    low = (u[:, :16] * torch.linspace(0.5, 0.05, 16)) @ v[:, :16].T  # rank 16 carries most of the change
    return low + noise * 0.1


def accuracy(ranks: list[int]) -> None:
    from likeness.models.lora_extract import low_rank

    g = torch.Generator().manual_seed(0)
    print(f"{'layer':<24} {'spectrum':<16} {'rank':>4} {'exact s':>8} {'rand s':>7} {'speed-up':>8} "
          f"{'exact err':>9} {'rand err':>9} {'excess':>9}")
    worst = 0.0
    for label, shape in SHAPES.items():
        for kind in ("flat noise", "power law 1/i", "rank 16 + noise"):
            matrix = spectrum_matrix(shape, kind, g)
            for rank in ranks:
                figures = {}
                for method in ("exact", "randomized"):
                    started = time.perf_counter()
                    f = low_rank(matrix, rank, method)
                    figures[method] = (time.perf_counter() - started, (f.residual_sq / f.diff_sq) ** 0.5)
                (te, ee), (tr, er) = figures["exact"], figures["randomized"]
                excess = er / ee - 1 if ee > 0 else 0.0  # relative error above the optimum's
                worst = max(worst, excess)
                print(f"{label:<24} {kind:<16} {rank:>4} {te:>8.3f} {tr:>7.3f} {te / tr:>7.1f}x "
                      f"{ee:>9.5f} {er:>9.5f} {excess:>8.3%}", flush=True)
    print(f"worst excess of the randomized residual over the exact optimum: {worst:.3%}")


# --- LoRA step against the full fine-tune's, tiny model ---------------------------------------


def train_child(settings_json: Path, warmup: int, steps: int) -> dict:
    """Time `steps` training steps of the settings in `settings_json` in this process (the child)."""
    from host_memory import PeakLive, live_bytes
    from likeness.settings import Settings
    from likeness.trainer.loop import Processes, Trainer
    from train_bench import timed

    settings = Settings.model_validate_json(settings_json.read_text())
    before = live_bytes()
    t = Trainer(settings, Processes(1, 0, torch.device("cpu")), lambda m: None, ())
    batch = t.data.load(t.data.sampler.batches(0)[0], 0)
    built = live_bytes()

    def step(i: int) -> None:
        t.forward_backward(batch, i)
        t.optimizer_step()

    with PeakLive() as peak:
        median = timed(step, warmup, steps)
    trained = [p for part in ("unet", "text_encoder") for p in getattr(t.pipe, part).parameters() if p.requires_grad]
    state = [v for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"median_s": median, "step_live_mib": (peak.bytes - built) / 2**20,
            "peak_live_mib": (peak.bytes - before) / 2**20,
            "optimizer_mib": sum(v.numel() * v.element_size() for v in state) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in trained)}


def train_comparison(args: argparse.Namespace) -> None:
    from train_bench import prepared_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = prepared_settings(Path(tmp), args.resolution, 1).model_dump(mode="json")
        settings["training"]["text_encoder_2"]["train"] = False  # LoRA trains the UNet and TE1 only: the same parts
        runs: dict[str, list[dict]] = {"fine_tune": [], "lora": []}
        for _ in range(args.repeats):  # alternating, so that a busy spell of the machine hits both
            for method in runs:
                settings["training"]["method"] = method
                settings["training"]["lora"] |= {"rank": args.lora_rank, "layer_preset": "attn-mlp"}
                path = Path(tmp) / f"{method}.json"
                path.write_text(json.dumps(settings))
                done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--train-child",
                                       str(path), str(args.warmup), str(args.steps)],
                                      check=True, capture_output=True, text=True)
                runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    full, lora = results["fine_tune"], results["lora"]
    print(f"tiny SDXL, {args.resolution} px, batch 1, {args.threads} thread(s); each figure the median of "
          f"{args.repeats} processes per method, step time the median of {args.steps} steps after {args.warmup}; "
          f"LoRA rank {args.lora_rank}, attn-mlp, UNet + TE1 trained in both")
    print(f"{'':<34} {'fine-tune':>10} {'LoRA':>10} {'LoRA/full':>10}")
    rows = (("step time ms (median)", "median_s", 1000, ".1f"),
            ("live heap above the models, MiB", "step_live_mib", 1, ".2f"),
            ("live heap at the peak, MiB", "peak_live_mib", 1, ".2f"),
            ("optimizer state MiB", "optimizer_mib", 1, ".3f"),
            ("peak RSS MiB (torch itself too)", "peak_rss_mib", 1, ".0f"),
            ("trainable parameters", "trainable", 1, ".0f"))
    for label, key, scale, fmt in rows:
        a, b = full[key] * scale, lora[key] * scale
        print(f"{label:<34} {a:>10{fmt}} {b:>10{fmt}} {b / a:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--exact-ranks", type=int, nargs="*", default=[],
                        help="ranks also extracted with the exact method, for the comparison")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--accuracy", action="store_true", help="randomized against exact factors on single layers")
    parser.add_argument("--train", action="store_true", help="LoRA step against the full fine-tune's (tiny model)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=4, help="the tiny model's layers are 32-64 wide")
    parser.add_argument("--repeats", type=int, default=3, help="processes per method (--train)")
    parser.add_argument("--child", nargs=5, metavar=("BASE", "TUNED", "OUT", "RANK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--train-child", nargs=3, metavar=("SETTINGS", "WARMUP", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        base, tuned, out, rank, method = args.child
        print(json.dumps(extract_child(Path(base), Path(tuned), Path(out), int(rank), method)))
        return
    if args.train_child:
        print(json.dumps(train_child(Path(args.train_child[0]), int(args.train_child[1]), int(args.train_child[2]))))
        return
    if args.accuracy:
        return accuracy(args.ranks)
    if args.train:
        return train_comparison(args)
    runs = [(rank, "auto") for rank in args.ranks] + [(rank, "exact") for rank in args.exact_ranks]
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        started = time.perf_counter()
        base, tuned = build_pair(Path(tmp), args.tiny)
        print(f"pair built in {time.perf_counter() - started:.0f} s: {tuned.stat().st_size / 2**30:.2f} GiB each", flush=True)
        print(f"{'rank':>5} {'method':>6} {'time s':>7} {'peak RSS GiB':>12} {'peak heap GiB':>13} {'file MiB':>9} "
              f"{'UNet err':>9} {'TE1 err':>8} {'layers':>7}", flush=True)
        for rank, method in runs:
            out = Path(tmp) / f"lora-{rank}-{method}.safetensors"
            done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                                   "--child", str(base), str(tuned), str(out), str(rank), method],
                                  check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{rank:>5} {method:>6} {r['seconds']:>7.1f} {r['peak_rss_gib']:>12.2f} {r['peak_live_gib']:>13.2f} {r['mib']:>9.1f} "
                  f"{r['error']['unet']:>9.4f} {r['error']['te1']:>8.4f} {sum(r['layers'].values()):>7}", flush=True)


if __name__ == "__main__":
    main()
