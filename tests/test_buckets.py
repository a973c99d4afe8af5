"""Aspect-ratio buckets: OneTrainer's bucket set and assignment, cover + crop, batches of one bucket."""

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from likeness.buckets import (Bucket, assign, bucket_set, centre_crop, cover_size, jittered_crop,
                                      nearest_bucket)
from likeness.content import HashIndex
from likeness.settings import ResizeSettings
from likeness.stages import load_rows
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.trainer.epoch_sampler import ConceptItems, EpochSampler, epoch_samples
from likeness.workspace import Workspace

# The notes' list for T = 1024, as width x height (ratios h:w 1:1 ... 1:4 and transposes).
BUCKETS_1024 = ["1024x1024", "1152x896", "1280x832", "1344x768", "1472x704", "1600x640", "1792x576", "1920x576",
                "2048x512"]


def test_the_1024_bucket_set_is_onetrainers():
    keys = {b.key for b in bucket_set(1024)}
    transposes = {f"{k.split('x')[1]}x{k.split('x')[0]}" for k in BUCKETS_1024}
    assert keys == set(BUCKETS_1024) | transposes and len(keys) == 17
    for bucket in bucket_set(1024):
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert abs(bucket.width * bucket.height / 1024**2 - 1) < 0.1  # about resolution^2 pixels


def test_other_resolutions_and_quantizations():
    assert {b.key for b in bucket_set(512)} >= {"512x512", "576x448", "448x576", "1024x256", "256x1024"}
    assert all(b.width % 16 == 0 and b.height % 16 == 0 and b.width > 0 for b in bucket_set(64, 16))
    with pytest.raises(ValueError, match="quantization"):
        bucket_set(32, 64)


# (photo width, height) -> (bucket, cover size, centred crop (left, top)) at T = 1024. The bucket is the one
# whose h/w is nearest the photo's; the photo is scaled to cover it (other side rounded), then cropped centred.
@pytest.mark.parametrize("size, bucket, cover, crop", [
    ((4000, 3000), "1152x896", (1195, 896), (21, 0)),   # 4:3 camera photo: h/w 0.75, nearest 896/1152 = 0.78
    ((3000, 4000), "896x1152", (896, 1195), (0, 21)),   # portrait: the transpose
    ((1000, 1000), "1024x1024", (1024, 1024), (0, 0)),  # square, enlarged
    ((500, 2000), "512x2048", (512, 2048), (0, 0)),     # exactly 1:4
    ((2000, 500), "2048x512", (2048, 512), (0, 0)),
    ((1920, 1080), "1344x768", (1365, 768), (10, 0)),   # 16:9: 0.5625, nearest 768/1344 = 0.571
    ((1080, 1920), "768x1344", (768, 1365), (0, 10)),
    ((3000, 2000), "1280x832", (1280, 853), (0, 10)),   # 3:2: 0.667, nearest 832/1280 = 0.65 (relatively taller)
    ((1024, 1280), "896x1152", (922, 1152), (13, 0)),   # 4:5: 1.25, nearest 1152/896 = 1.286
    ((6000, 1000), "2048x512", (3072, 512), (512, 0)),  # wider than 4:1: the widest bucket, cropped hard
])
def test_assignment_table(size, bucket, cover, crop):
    got_bucket, got_cover, got_crop = assign(*size, 1024)
    assert (got_bucket.key, got_cover, got_crop) == (bucket, cover, crop)


def test_nearest_ratio_is_by_height_over_width():
    buckets = bucket_set(1024)
    for w, h in [(100, 77), (77, 100), (300, 1000), (1000, 301), (640, 480)]:
        chosen = nearest_bucket(w, h, buckets)
        assert all(abs(chosen.aspect - h / w) <= abs(b.aspect - h / w) for b in buckets)


def test_cover_then_crop_stays_inside_and_fills_the_bucket():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(16, 5000), rng.randint(16, 5000)
        bucket, cover, (left, top) = assign(w, h, 1024)
        assert cover[0] >= bucket.width and cover[1] >= bucket.height
        assert bucket.width in (cover[0],) or bucket.height in (cover[1],)  # one side fits exactly
        assert 0 <= left <= cover[0] - bucket.width and 0 <= top <= cover[1] - bucket.height
        jl, jt = jittered_crop(cover, bucket, random.Random(1))
        assert 0 <= jl <= cover[0] - bucket.width and 0 <= jt <= cover[1] - bucket.height
    assert centre_crop((1195, 896), Bucket(1152, 896)) == (21, 0)
    lefts = {jittered_crop((1195, 896), Bucket(1152, 896), random.Random(s))[0] for s in range(50)}
    assert len(lefts) > 10 and max(lefts) <= 43  # jitter spreads over the slack
    assert cover_size(1152, 896, Bucket(1152, 896)) == (1152, 896)


def test_bucket_keys_parse_and_reject_nonsense():
    assert Bucket.parse("1152x896") == Bucket(1152, 896) and Bucket(1152, 896).key == "1152x896"
    for bad in ("1152", "ax896", "0x64", "64x64x3"):
        with pytest.raises(ValueError, match="bucket"):
            Bucket.parse(bad)
    with pytest.raises(ValueError, match="width and height"):
        nearest_bucket(0, 10, bucket_set(1024))


# --- the epoch sampler with buckets ----------------------------------------------------------------


def _bucketed(n_person=36, n_reg=5000):
    person = [f"person/{i:03d}" for i in range(n_person)]
    reg = [f"reg/{i:04d}" for i in range(n_reg)]
    shapes = ("1024x1024", "896x1152", "1152x896")
    bucket = {item: shapes[i % 3] for i, item in enumerate(person)} | {item: shapes[i % 2] for i, item in enumerate(reg)}
    concepts = [ConceptItems("person", person, 1.0), ConceptItems("reg", reg, 0.0072)]
    return concepts, bucket


@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (4, 1), (3, 2)])
def test_batches_never_mix_buckets_and_keep_onetrainers_counts(batch_size, world_size):
    concepts, bucket = _bucketed()
    samplers = [EpochSampler(concepts, batch_size, seed=42, world_size=world_size, rank=r,
                             group_of=lambda s: bucket[s.item]) for r in range(world_size)]
    for epoch in range(3):
        drawn = epoch_samples(concepts, epoch, 42)
        assert Counter(s.concept for s in drawn) == {"person": 36, "reg": 36}  # per-epoch samples as before
        per_rank = [s.batches(epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1  # every process trains the same number of steps
        for step in zip(*per_rank):  # one global batch: all ranks' slices together
            samples = [s for part in step for s in part]
            assert len({bucket[s.item] for s in samples}) == 1 and all(len(p) == batch_size for p in step)
        used = Counter(bucket[s.item] for batches in per_rank for b in batches for s in b)
        wanted = Counter(bucket[s.item] for s in drawn)
        size = batch_size * world_size
        assert used == Counter({k: n - n % size for k, n in wanted.items() if n >= size})  # leftovers per bucket dropped


def test_grouping_is_seeded_and_resumable():
    concepts, bucket = _bucketed(12, 40)
    make = lambda seed: EpochSampler(concepts, 2, seed=seed, group_of=lambda s: bucket[s.item])  # noqa: E731
    assert make(42).batches(1) == make(42).batches(1) and make(42).batches(1) != make(7).batches(1)
    sampler = make(42)
    first = [next(iter(sampler)) for _ in range(1)]
    state = sampler.state_dict()
    rest = list(sampler)
    resumed = make(42)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and first + rest == make(42).batches(0)
    assert sampler.batches_in_epoch(0) == len(make(42).batches(0))


def test_without_grouping_nothing_changes():
    concepts, bucket = _bucketed()
    plain = EpochSampler(concepts, 1, seed=42)
    grouped = EpochSampler(concepts, 1, seed=42, group_of=lambda s: "one bucket")
    assert plain.batches(0) != grouped.batches(0)  # batch order reshuffled ...
    assert sorted(plain.batches(0)) == sorted(grouped.batches(0))  # ... the same samples at batch 1
    assert plain.batches_in_epoch(5) == plain.num_batches == 72


# --- the resize stage in bucket mode -------------------------------------------------------------


def test_resize_stage_scales_to_cover_the_bucket_and_keeps_the_mask_aligned(tmp_path, photo):
    from likeness.settings import CaptionSource, Concept

    folder = tmp_path / "photos"
    photo(folder / "wide.png", 1, size=(90, 60))  # 3:2
    photo(folder / "tall.png", 0, size=(40, 100))  # 2:5
    mask = np.zeros((60, 90), dtype=np.uint8)
    mask[10:30, 50:80] = 255
    Image.fromarray(mask).save(folder / "wide-masklabel.png")
    concepts = [Concept(name="c", path=folder, caption=CaptionSource(source="text", text="x"))]
    ws, index = Workspace(tmp_path / "ws"), HashIndex()
    scan, report = scan_stage(concepts, 16, ws, index)
    report.raise_for_errors()
    settings = ResizeSettings(resolution=64, min_side=16, mode="bucket", bucket_quantization=16)
    rows = {r["stem"]: r for r in load_rows(resize_stage(scan, settings, ws, index), ws)}
    wide, tall = rows["wide"], rows["tall"]
    assert (wide["bucket"], wide["width"], wide["height"]) == ("80x48", 80, 48)  # 0.667 -> 0.6
    assert (wide["scaled_width"], wide["scaled_height"], wide["offset_left"], wide["offset_top"]) == (80, 53, 0, 2)
    assert Image.open(wide["prepared"]).size == (80, 53)  # uncropped: the latent stage crops per variation
    assert (tall["bucket"], Image.open(tall["prepared"]).size) == ("48x96", (48, 120))  # h/w 2.5: 2.0 is nearer than 3.5
    scaled = np.asarray(Image.open(wide["user_mask"])) > 127
    assert scaled.shape == (53, 80)
    ys, xs = np.nonzero(scaled)  # the square moved with the image: 80/90 scale
    assert abs(xs.min() - 50 * 80 / 90) <= 1 and abs(ys.max() + 1 - 30 * 53 / 60) <= 1
