"""What Prefect costs the whole demo pipeline, and what a no-change re-run costs.

Runs the demo profile (tiny models, demo photos, CPU) three ways, each in its own fresh workspace
and in its own subprocess so peak RSS is per run:
  plain    the same plain stage functions (tasks/*.py) called in order, no Prefect at all
  prefect  the `pipeline` flow on the local ephemeral Prefect (what `likeness demo` runs)
  rerun    the `pipeline` flow again on the prefect workspace: everything `Cached`
and prints wall time, peak RSS and the prefect/plain ratio (median of --repeats runs each).

    .venv/bin/python bench/pipeline_bench.py [--repeats 1] [--set training.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def settings_for(root: Path, overrides: list[str]):
    from likeness.profiles import load_profile

    demo = root / "workspace" / "demo"
    return load_profile("demo-cpu", [
        f'run.workspace="{demo}"', f'model.base_model="{demo}/models/sdxl"', f'masks.model="{demo}/models/clipseg"',
        f'evaluation.dino_model="{demo}/models/dino"', f'evaluation.clip_model="{demo}/models/clip"',
        f'concepts[0].path="{demo}/photos/person"', f'concepts[1].path="{demo}/photos/regularization"', *overrides])


def prepare_inputs(settings) -> None:
    from likeness.demo import demo_paths
    from likeness.demo_data import write_demo_photos
    from likeness.models.tiny import save_tiny_models

    models, photos = demo_paths(settings)
    save_tiny_models(models, seed=settings.run.seed)
    write_demo_photos(photos, seed=settings.run.seed)


def run_plain(settings) -> None:
    """The pipeline's stage functions in the order the flows call them, without Prefect."""
    from likeness.tasks.balance import balance_stage
    from likeness.tasks.captions import captions_stage
    from likeness.tasks.scan import scan_stage
    from likeness.tasks.evaluate.grid import grid_stage
    from likeness.tasks.latents import latents_stage
    from likeness.trainer.loop import train
    from likeness.manifest import manifest_stage
    from likeness.tasks.masks import masks_stage
    from likeness.tasks.resize import resize_stage
    from likeness.tasks.evaluate.scores import scores_stage
    from likeness.tasks.evaluate.select import select_stage
    from likeness.workspace import Workspace

    ws = Workspace.from_settings(settings)
    index = ws.hashes()
    s, device = settings, settings.run.device
    scan, _ = scan_stage(s.concepts, s.resize.min_side, ws, index, workers=2)
    resize = resize_stage(scan, s.resize, ws, index, workers=2)
    masks = masks_stage(resize, s.masks, s.concepts, ws, index, device)
    captions = captions_stage(resize, s.concepts, s.captioner, s.run.seed, ws, index, device)
    balance, _ = balance_stage(resize, s.concepts, s.training, ws, index, class_prior_images=s.evaluation.class_prior_images)
    manifest = manifest_stage(resize, masks, captions, balance, s.concepts, ws, index)
    latents_stage(manifest, s, ws, index, device)
    trained = train(s, log=lambda line: None)
    grid = grid_stage([str(c.path) for c in trained.checkpoints], s, ws, index)
    scores = scores_stage(grid, s, ws, index)
    select_stage(scores, s.evaluation.selection, s.output_destination, ws, index)


def run_prefect(settings) -> None:
    from likeness.flows.pipeline import pipeline

    pipeline(settings)


def child(mode: str, root: Path, overrides: list[str]) -> None:
    """One measured run in this process; prints a JSON line with wall time and peak RSS."""
    settings = settings_for(root, overrides)
    prepare_inputs(settings)
    start = time.perf_counter()
    (run_plain if mode == "plain" else run_prefect)(settings)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_rss_mib": peak_mib}))


def measure(mode: str, root: Path, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--root", str(root), *sum((["--set", o] for o in overrides), [])]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--child", choices=["plain", "prefect", "rerun"])
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root, args.overrides)

    runs: dict[str, list[dict]] = {"plain": [], "prefect": [], "rerun": []}
    for _ in range(args.repeats):
        for mode in ("plain", "prefect"):
            root = Path(tempfile.mkdtemp(prefix=f"likeness-bench-{mode}-"))
            try:
                runs[mode].append(measure(mode, root, args.overrides))
                if mode == "prefect":
                    runs["rerun"].append(measure("rerun", root, args.overrides))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    median = {m: statistics.median(r["wall_s"] for r in rs) for m, rs in runs.items()}
    for mode, rs in runs.items():
        print(f"{mode:8s} wall {median[mode]:7.1f} s (median of {len(rs)})   "
              f"peak RSS {max(r['peak_rss_mib'] for r in rs):7.0f} MiB")
    print(f"prefect / plain wall ratio: {median['prefect'] / median['plain']:.2f}  "
          f"(Prefect overhead {median['prefect'] - median['plain']:.1f} s)")
    print(f"no-change re-run / first run: {median['rerun'] / median['prefect']:.3f}")


if __name__ == "__main__":
    main()
