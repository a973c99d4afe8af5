"""Host memory of the reference run at real SDXL size, on a CPU, without a GPU or a download.

Builds a full-size SDXL with random weights (bench/random_sdxl.py: meta-device init, then a
deterministic fill per tensor, in the reference run's dtypes), writes it as a diffusers folder and
as one single file, and prints, each beside the floor it is compared with:

- the host RAM of `load_models` (the loop's own loader) from the folder and from the single file,
  each in a fresh process: peak RSS, and what is left live / resident once loaded;
- the peak live memory of one real training step (the loop's `forward_backward` +
  `optimizer_step`) at 512 px with the reference settings, and with the fused back pass off,
  `training.offload_frozen` off and Adafactor `factor_conv = "matrix"`; the floor is the weights
  on the device + the optimizer state (+ one gradient set without the fused back pass);
- the peak RSS of the export command (`python -m likeness.models.checkpoint FOLDER OUT.safetensors`).

"Live" is what the allocator has handed out (bench/host_memory.py). On a CPU the "device" is host
memory too, so the step's device figure is the live peak less the bytes of the parts that
offload_frozen keeps on the host (they would not be on the GPU); both are printed.

    flock /work/wt/bigram.lock python bench/real_size.py              # ~15 min, ~12 GB, ~15 GB of disk
    python bench/real_size.py --tiny                                  # the same code on the tests' tiny model
    python bench/real_size.py --phases steps --resolution 256          # one part only
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when run from elsewhere

from host_memory import PeakLive, child_peak_rss, live_bytes, trim  # noqa: E402
from random_sdxl import build_random_sdxl, random_batch, reference_settings, step_trainer  # noqa: E402

GB = 1e9
PHASES = ("loaders", "steps", "export")
VARIANTS = {  # name -> settings sections merged over the reference run's
    "reference (fused, offload, kernel)": {},
    "fused back pass off": {"optimizer": {"fused_back_pass": False}},
    "offload_frozen off": {"training": {"offload_frozen": False}},
    "factor_conv matrix": {"optimizer": {"adafactor": {"factor_conv": "matrix"}}},
}


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def proc_status() -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def quiet() -> None:
    """No library progress bars or warnings in our output."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


# --- phases run in their own process ----------------------------------------------------------


def write_models(work: Path, tiny: bool) -> dict:
    """The random pipeline as a diffusers folder and as one single file (all bf16 but the fp32 VAE)."""
    from likeness.models.checkpoint import CheckpointInfo, save_single_file

    started = time.perf_counter()
    pipe = build_random_sdxl("cpu", tiny=tiny)
    built = time.perf_counter() - started
    pipe.save_pretrained(work / "sdxl", safe_serialization=True)
    save_single_file(pipe, work / "sdxl.safetensors", CheckpointInfo("random", 0, 0), "bfloat16")
    parts = {part: nbytes(getattr(pipe, part)) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
    params = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) for part in parts}
    return {"built_s": built, "bytes": parts, "params": params, "peak_rss": proc_status()["VmHWM"]}


def load(work: Path, source: str) -> dict:
    """`load_models` of the loop from the folder or the single file, on the CPU."""
    from likeness.trainer.loop import load_models

    model = {"folder": {"base_model": str(work / "sdxl")},
             "file": {"base_model": str(work / "sdxl.safetensors"), "config": str(work / "sdxl")}}[source]
    settings = reference_settings("cpu", model=model)
    started = time.perf_counter()
    pipe, _ = load_models(settings, torch.device("cpu"))
    seconds = time.perf_counter() - started
    loaded = {"live_loaded": live_bytes(), **{f"{k}_loaded": v for k, v in proc_status().items()}}
    touch(pipe)  # weights memory-mapped from the files count once read (the first step or a move to the GPU)
    dtypes = {part: str(getattr(pipe, part).dtype).removeprefix("torch.") for part in ("unet", "vae", "text_encoder_2")}
    floor = sum(nbytes(getattr(pipe, part)) for part in ("unet", "vae", "text_encoder", "text_encoder_2"))
    return {"seconds": seconds, "live": live_bytes(), "floor": floor, "dtypes": dtypes, **proc_status(), **loaded}


@torch.no_grad()
def touch(pipe) -> None:
    """Read every weight once, as a move to the GPU or a first training step does."""
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for tensor in getattr(pipe, part).state_dict().values():
            tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one element per 4 KiB page


def adafactor_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def steps(tiny: bool, resolution: int) -> list[dict]:
    """One training step per variant on one random pipeline; peak live memory of each."""
    device = torch.device("cpu")
    pipe = build_random_sdxl(device, tiny=tiny)
    batch = random_batch(pipe, resolution)
    rows = []
    for name, sections in VARIANTS.items():
        settings = reference_settings("cpu", **sections)
        t = step_trainer(pipe, settings, device)
        gc.collect()
        trim()
        before = live_bytes()
        with PeakLive() as peak:
            loss = t.forward_backward(batch, 0)
            gradients = sum(p.grad.numel() * p.grad.element_size() for p in t.all_params if p.grad is not None)
            t.optimizer_step(loss)
        offloaded = sum(nbytes(getattr(pipe, part)) for part in ("vae", "text_encoder_2")
                        if settings.training.offload_frozen)
        weights = sum(nbytes(getattr(pipe, part)) for part in ("unet", "vae", "text_encoder", "text_encoder_2"))
        state = adafactor_state_bytes(t.optimizer)
        rows.append({"variant": name, "before": before, "peak": peak.bytes, "offloaded": offloaded,
                     "weights": weights, "state": state, "gradients": gradients})
        if t.fused is not None:
            t.fused.remove()  # the hooks would step this optimizer in the next variant's backward
        t.optimizer.zero_grad(set_to_none=True)
        del t
    return rows


# --- the parent: run the phases, print the table ----------------------------------------------


def run_phase(args: argparse.Namespace, phase: str, work: Path) -> tuple[dict | list, int]:
    """Run one phase in a fresh process; its JSON result and its own peak RSS (bytes)."""
    argv = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--resolution", str(args.resolution)]
    rss, output = child_peak_rss(argv + (["--tiny"] if args.tiny else []))
    return json.loads(output.strip().splitlines()[-1]), rss


def report(args: argparse.Namespace, work: Path) -> None:
    size = "tiny" if args.tiny else "full-size"
    done = work / "written.json"  # models already written in --work: measured again, not rebuilt
    if done.is_file() and (work / "sdxl.safetensors").is_file():
        written, rss = json.loads(done.read_text()), 0
    else:
        written, rss = run_phase(args, "write", work)
        done.write_text(json.dumps(written))
    print(f"{size} SDXL, random weights: " + ", ".join(
        f"{part} {written['params'][part] / 1e6:,.1f} M ({written['bytes'][part] / GB:.2f} GB)" for part in written["bytes"])
        + (f"; built in {written['built_s']:.0f} s, written with peak RSS {rss / GB:.2f} GB" if rss else
           f"; as written before in {work}"))
    if "loaders" in args.phases:
        print("\nhost RAM of load_models (reference dtypes: bf16, fp32 VAE), each in a fresh process:")
        print(f"  {'source':<8} {'when':<22} {'peak RSS':>9} {'live':>6} {'RssAnon':>8} {'RssFile':>8} {'floor':>6} "
              f"{'peak/floor':>10}")
        for source in ("folder", "file"):
            row, _ = run_phase(args, f"load-{source}", work)
            for when, key in ((f"loaded ({row['seconds']:.0f} s)", "_loaded"), ("every weight read", "")):
                print(f"  {source:<8} {when:<22} {row['VmHWM' + key] / GB:9.2f} {row['live' + key] / GB:6.2f} "
                      f"{row['RssAnon' + key] / GB:8.2f} {row['RssFile' + key] / GB:8.2f} {row['floor'] / GB:6.2f} "
                      f"{row['VmHWM' + key] / row['floor']:10.2f}")
            print(f"  {'':<8} dtypes {row['dtypes']}")
        print("  floor: the weights themselves. RssFile: pages of the memory-mapped model files (the page cache, "
              "given back under pressure); goal <= 8 GB peak RSS")
    if "steps" in args.phases:
        rows, _ = run_phase(args, "steps", work)
        print(f"\none training step at {args.resolution} px (the loop's forward_backward + optimizer_step), live GB:")
        print(f"  {'variant':<36} {'peak':>6} {'device':>7} {'floor':>6} {'over':>6} {'state':>6} {'grads':>6}")
        for r in rows:
            device_peak = r["peak"] - r["offloaded"]
            floor = r["weights"] - r["offloaded"] + r["state"] + r["gradients"]
            print(f"  {r['variant']:<36} {r['peak'] / GB:6.2f} {device_peak / GB:7.2f} {floor / GB:6.2f} "
                  f"{(device_peak - floor) / GB:6.2f} {r['state'] / GB:6.3f} {r['gradients'] / GB:6.2f}")
        print("  device: peak less the parts offload_frozen keeps on the host (VAE, text encoder 2); floor: weights "
              "on the device + Adafactor state + gradients alive after backward; goal <= 7.5 GB with offload on")
    if "export" in args.phases:
        out = work / "export.safetensors"
        rss, _ = child_peak_rss([sys.executable, "-m", "likeness.models.checkpoint", str(work / "sdxl"), str(out),
                                 "--dtype", "bfloat16"])
        floor = sum(written["bytes"].values()) - written["bytes"]["vae"] / 2  # all of it in bf16
        print(f"\nexport (python -m likeness.models.checkpoint FOLDER OUT --dtype bfloat16): peak RSS {rss / GB:.2f} GB, "
              f"floor {floor / GB:.2f} GB (the weights in bf16), {out.stat().st_size / GB:.2f} GB written; goal <= 9 GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL (checks the script in seconds)")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution of the step (px)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--work", type=Path, help="folder for the written models (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = parser.parse_args()
    args.phases = [p for p in args.phases.split(",") if p]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:
        quiet()
        phases = {"write": lambda: write_models(args.work, args.tiny), "load-folder": lambda: load(args.work, "folder"),
                  "load-file": lambda: load(args.work, "file"), "steps": lambda: steps(args.tiny, args.resolution)}
        print(json.dumps(phases[args.phase]()))
        return
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        report(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="real-size-") as work:
            report(args, Path(work))


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        sys.exit(str(error))
