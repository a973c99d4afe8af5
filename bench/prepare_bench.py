"""Benchmark of the prepare flow (issue 3): images/s per stage on a first run, and the wall time of
a re-run with nothing changed. A script that prints figures, not a test.

    .venv/bin/python bench/prepare_bench.py                      # 200 photos up to 4000x3000
    .venv/bin/python bench/prepare_bench.py --count 50 --out /tmp/bench

Photos are generated once (scikit-image's real photos, scaled to mixed camera sizes, JPEG q90,
a quarter with an EXIF rotation) into OUT/photos and reused by later runs. Masks and latents use
the tiny CLIPSeg and tiny SDXL models (random weights, no download): their speed is the plumbing's,
not a real model's. Prefect runs against a temporary server in OUT/prefect-home (its start is not
counted). Resolution 1024, like the reference run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from pathlib import Path

SIZES = [(4000, 3000), (3000, 4000), (3264, 2448), (2448, 3264), (4000, 2250), (2048, 1536), (1600, 1200), (1080, 1350), (1024, 1024), (800, 600)]


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of mixed sizes (up to 4000x3000) made from real photos; kept between runs."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    rng = random.Random(seed)
    for i in range(len(existing), count):
        width, height = rng.choice(SIZES)
        source = Image.fromarray(sources[i % len(sources)])
        left, top = rng.randrange(source.width // 4), rng.randrange(source.height // 4)  # every photo different
        image = source.crop((left, top, left + source.width * 3 // 4, top + source.height * 3 // 4))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        exif = Image.Exif()
        if i % 4 == 3:  # stored sideways, displayed upright
            image, exif[0x0112] = image.transpose(Image.Transpose.ROTATE_90), 6
        image.save(folder / f"photo-{i:04d}.jpg", quality=90, exif=exif.tobytes())
    return sorted(folder.glob("*.jpg"))[:count]


def settings_for(out: Path, models, photos: Path):
    from likeness.settings import Settings

    return Settings.model_validate({
        "run": {"workspace": str(out / "workspace"), "device": "cpu", "retries": 0},
        "model": {"base_model": str(models.sdxl)},
        "concepts": [{"name": "person", "path": str(photos), "caption": {"source": "text", "text": "ohwx man"}}],
        "resize": {"resolution": 1024},
        "masks": {"model": str(models.clipseg)},
        "training": {"text_encoder_2": {"weight_dtype": "float32"}},
    })


def stage_seconds(flow_run_id) -> dict[str, float]:
    """Each task run's own run time, as the Prefect server recorded it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(100):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= 7 and all(r.state and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    return {r.name.rsplit("-", 1)[0]: r.total_run_time.total_seconds() for r in sorted(runs, key=lambda r: r.created)}


def decode_comparison(photos: list[Path], n: int = 20) -> tuple[float, float]:
    """Seconds per photo: our resize (JPEG draft decode) vs a full decode + Lanczos, as mogrify does."""
    from PIL import Image, ImageOps

    from likeness.tasks.resize import prepare_image

    sample = photos[:n]
    start = time.perf_counter()
    for path in sample:
        prepare_image(path, 1024)
    ours = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    for path in sample:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image.thumbnail((1024, 1024), Image.Resampling.LANCZOS, reducing_gap=None)
    return ours, (time.perf_counter() - start) / len(sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("workspace/bench-prepare"))
    args = parser.parse_args()
    out = args.out.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PREFECT_HOME"] = str(out / "prefect-home")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    start = time.perf_counter()
    photos = make_photos(out / "photos", args.count)
    megabytes = sum(p.stat().st_size for p in photos) / 1e6
    print(f"photos: {len(photos)} JPEGs, {megabytes:.0f} MB, ready in {time.perf_counter() - start:.0f} s")

    from likeness.flows.prepare import prepare
    from likeness.models.tiny import save_tiny_models

    shutil.rmtree(out / "workspace", ignore_errors=True)  # the first run starts from scratch
    settings = settings_for(out, save_tiny_models(out / "models"), out / "photos")
    warm_up()  # starts the temporary Prefect server: not counted

    start = time.perf_counter()
    state = prepare(settings, return_state=True)
    first = time.perf_counter() - start
    results = state.result()
    seconds = stage_seconds(state.state_details.flow_run_id)
    print(f"\nfirst run: {first:.1f} s wall for {len(photos)} photos ({len(photos) / first:.2f} photos/s end to end)")
    print(f"{'stage':<18}{'seconds':>9}{'items/s':>10}   (items: images; concepts for balance-concepts)")
    for (task, took), result in zip(seconds.items(), results.values(), strict=True):
        print(f"{task:<18}{took:>9.2f}{result.total / took if took else float('inf'):>10.1f}")

    start = time.perf_counter()
    state = prepare(settings, return_state=True)
    again = time.perf_counter() - start
    cached = [r.stage for r in state.result().values() if r.cached]
    print(f"\nno-change re-run: {again:.2f} s wall, {len(cached)}/7 stages Cached")

    ours, full = decode_comparison(photos)
    print(f"\nresize one photo to 1024 (single thread): {ours * 1000:.0f} ms with JPEG draft decoding, "
          f"{full * 1000:.0f} ms with a full decode (as mogrify): {full / ours:.1f}x")


def warm_up() -> None:
    from prefect import flow

    flow(name="warm-up")(lambda: None)()


if __name__ == "__main__":
    main()
