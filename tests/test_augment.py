"""Augmentations: seeded per (seed, item, variation), masks follow their image, tag shuffle, and the
latent cache keyed per variation and per bucket."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from likeness.augment import augment, is_active, is_random, shift_hue, shuffle_tags, variation_rng
from likeness.buckets import Bucket
from likeness.content import HashIndex
from likeness.latent_index import epoch_rows, index_time_ids, read_latents_index
from likeness.manifest import read_manifest
from likeness.settings import ImageAugmentations
from likeness.tasks import latents as latents_module
from likeness.tasks.latents import latents_stage

EVERYTHING = ImageAugmentations(
    crop_jitter=True, flip="random", rotate="random", rotate_max_angle=30, brightness="random",
    brightness_max_strength=0.3, contrast="random", contrast_max_strength=0.3, saturation="random",
    saturation_max_strength=0.3, hue="random", hue_max_strength=0.1, mask_rotate_crop=True, circular_mask_shrink=False,
)


def square_photo(size=(96, 72), box=(40, 20, 70, 50)) -> tuple[Image.Image, Image.Image]:
    """A grey image with a red square, and a mask of exactly that square."""
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((230, 20, 20), box)
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return image, mask


def test_same_seed_item_variation_same_pixels_other_variation_other_pixels():
    image, mask = square_photo()
    target = Bucket(80, 64)
    make = lambda seed, item, v: augment(image, mask, EVERYTHING, target, variation_rng(seed, item, v))  # noqa: E731
    first, again = make(42, "person/p0", 0), make(42, "person/p0", 0)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert np.array_equal(np.asarray(first.mask), np.asarray(again.mask))
    assert (first.crop_left, first.crop_top) == (again.crop_left, again.crop_top)
    for other in (make(42, "person/p0", 1), make(42, "person/p1", 0), make(7, "person/p0", 0)):
        assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    assert first.image.size == first.mask.size == (80, 64) and first.image.mode == "RGB"


def red(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)


@pytest.mark.parametrize("aug", [
    ImageAugmentations(flip="fixed"),
    ImageAugmentations(rotate="fixed", rotate_max_angle=35),
    ImageAugmentations(crop_jitter=True, flip="random", rotate="random", rotate_max_angle=45),
    ImageAugmentations(mask_rotate_crop=True),
    EVERYTHING.model_copy(update={"hue": "off", "saturation": "off"}),  # colours stay recognisably red
])
def test_the_mask_still_covers_the_square_after_geometric_transforms(aug):
    image, mask = square_photo()
    for variation in range(6):
        out = augment(image, mask, aug, Bucket(64, 64), variation_rng(1, "x", variation))
        square, masked = red(out.image), np.asarray(out.mask) > 127
        assert square.sum() > 50  # the square is still in the crop
        inside = (square & masked).sum() / square.sum()
        assert inside > 0.9, f"only {inside:.0%} of the red square is masked (variation {variation})"
        assert (masked & ~square).sum() / masked.sum() < 0.15  # and the mask is not elsewhere


def test_flip_moves_the_square_and_its_mask_to_the_other_side():
    image, mask = square_photo(size=(64, 64), box=(0, 0, 16, 16))
    out = augment(image, mask, ImageAugmentations(flip="fixed"), Bucket(64, 64), random.Random(0))
    assert red(out.image)[:16, 48:].all() and (np.asarray(out.mask)[:16, 48:] == 255).all()
    assert not red(out.image)[:, :40].any()


def test_no_augmentation_is_the_centred_crop():
    image, mask = square_photo(size=(96, 64))
    out = augment(image, mask, ImageAugmentations(), Bucket(64, 64), random.Random(0))
    assert (out.crop_left, out.crop_top) == (16, 0)
    assert np.array_equal(np.asarray(out.image), np.asarray(image)[:, 16:80])
    assert not is_active(ImageAugmentations()) and not is_random(ImageAugmentations())
    assert is_active(ImageAugmentations(flip="fixed")) and not is_random(ImageAugmentations(flip="fixed"))


def test_colour_changes_touch_the_image_only():
    image, mask = square_photo(size=(64, 64))
    brighter = augment(image, mask, ImageAugmentations(brightness="fixed", brightness_max_strength=0.5),
                       Bucket(64, 64), random.Random(0))
    assert np.asarray(brighter.image)[0, 0].tolist() == [192, 192, 192]  # 128 x 1.5
    assert np.array_equal(np.asarray(brighter.mask), np.asarray(mask))
    cyan = np.asarray(shift_hue(Image.new("RGB", (4, 4), (230, 20, 20)), 0.5))[0, 0]
    assert cyan[0] < 60 and cyan[1] > 180 and cyan[2] > 180  # half a turn: red -> cyan
    grey = augment(image, None, ImageAugmentations(saturation="fixed", saturation_max_strength=1.0), Bucket(64, 64),
                   random.Random(0))
    assert grey.mask is None and np.asarray(grey.image).std(axis=2).max() > 30  # 2x saturation, still colour


def test_circular_shrink_keeps_a_disc_inside_the_mask():
    image, mask = square_photo(size=(64, 64), box=(8, 8, 56, 56))
    aug = ImageAugmentations(circular_mask_shrink=True)
    sizes = set()
    for variation in range(5):
        out = augment(image, mask, aug, Bucket(64, 64), variation_rng(0, "x", variation))
        shrunk = np.asarray(out.mask) > 127
        assert shrunk.sum() > 0 and not (shrunk & (np.asarray(mask) == 0)).any()
        sizes.add(int(shrunk.sum()))
        assert np.array_equal(np.asarray(out.image), np.asarray(image))
    assert len(sizes) > 1


def test_mask_and_image_sizes_must_agree():
    image, _ = square_photo()
    with pytest.raises(ValueError, match="mask is 10x10"):
        augment(image, Image.new("L", (10, 10)), EVERYTHING, Bucket(64, 64), random.Random(0))


# --- captions ------------------------------------------------------------------------------------


def test_tag_shuffle_keeps_the_first_tags_and_every_tag():
    caption = "ohwx man, smiling, outdoors, red shirt, glasses, beard"
    shuffled = {shuffle_tags(caption, ",", 1, variation_rng(42, "p0", v, "tags")) for v in range(8)}
    assert len(shuffled) > 1
    for text in shuffled:
        tags = text.split(", ")
        assert tags[0] == "ohwx man" and sorted(tags) == sorted(t.strip() for t in caption.split(","))
    assert shuffle_tags(caption, ",", 1, variation_rng(42, "p0", 3, "tags")) == \
        shuffle_tags(caption, ",", 1, variation_rng(42, "p0", 3, "tags"))
    assert shuffle_tags("a | b | c", "|", 3, random.Random(0)) == "a, b, c"  # joined with ', ' as OneTrainer
    assert shuffle_tags("ohwx man", ",", 0, random.Random(0)) == "ohwx man"


def test_captions_stage_shuffles_each_text_variation(prepare_settings):
    from likeness.tasks.captions import captions_stage
    from likeness.tasks.scan import scan_stage
    from likeness.tasks.resize import resize_stage
    from likeness.stages import load_rows
    from likeness.workspace import Workspace

    settings = prepare_settings()
    person = settings.concepts[0].model_copy(update={"text_variations": 4, "caption": settings.concepts[0].caption.model_copy(
        update={"text": "ohwx man, smiling, outdoors, red shirt, glasses", "shuffle_tags": True})})
    concepts = [person, settings.concepts[1]]
    ws, index = Workspace.from_settings(settings), HashIndex()
    scan, _ = scan_stage(concepts, 32, ws, index)
    captions = load_rows(captions_stage(resize_stage(scan, settings.resize, ws, index), concepts, settings.captioner,
                                        42, ws, index), ws)
    p0 = next(r for r in captions if r["id"] == "person/p0")["captions"]
    assert len(p0) == 4 and len(set(p0)) > 1 and all(c.startswith("ohwx man, ") for c in p0)
    assert next(r for r in captions if r["id"] == "reg/r0")["captions"] == ["man"]


# --- the latent cache per variation and per bucket ---------------------------------------------------


def _manifest(settings):
    """Every prepare stage before the latents, run plainly (no Prefect)."""
    from likeness.tasks.balance import balance_stage
    from likeness.tasks.captions import captions_stage
    from likeness.tasks.scan import scan_stage
    from likeness.manifest import manifest_stage
    from likeness.tasks.masks import masks_stage
    from likeness.tasks.resize import resize_stage
    from likeness.workspace import Workspace

    ws = Workspace.from_settings(settings)
    index = ws.hashes()
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    report.raise_for_errors()
    resize = resize_stage(scan, settings.resize, ws, index)
    masks = masks_stage(resize, settings.masks, settings.concepts, ws, index, device="cpu")  # mixed sizes in bucket mode
    captions = captions_stage(resize, settings.concepts, settings.captioner, settings.run.seed, ws, index)
    balance, _ = balance_stage(resize, settings.concepts, settings.training, ws, index,
                               class_prior_images=settings.evaluation.class_prior_images)
    return ws, manifest_stage(resize, masks, captions, balance, settings.concepts, ws, index)


def _bucketed_settings(prepare_settings, variations: int):
    settings = prepare_settings(resize={"mode": "bucket", "bucket_quantization": 16})
    aug = ImageAugmentations(flip="random", brightness="random", brightness_max_strength=0.4)
    person = settings.concepts[0].model_copy(update={"image_variations": variations, "augmentations": aug})
    return settings.model_copy(update={"concepts": [person, settings.concepts[1]]})


def test_latents_are_cached_per_variation_and_per_bucket(prepare_settings, monkeypatch):
    settings = _bucketed_settings(prepare_settings, 1)
    ws, manifest = _manifest(settings)
    rows = read_manifest(ws.manifest, ws).set_index("id")
    assert set(rows["bucket"]) == {"64x64", "80x48"}  # astronaut is square; chelsea, coffee and the 4:3 reg photos wide
    first = latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    assert (first.processed, first.reused) == (7, 0)
    index = read_latents_index(ws.latents_index)
    for row in index.itertuples():
        target = Bucket.parse(row.bucket)
        assert load_file(row.latent_path)["latent"].shape == (4, target.height // 8, target.width // 8)
    wide = index.set_index("id").loc["person/p1"]  # chelsea 451x300: covers 80x53, centred crop top 2
    assert (wide.bucket, wide.crop_top, wide.crop_left, wide.target_height, wide.target_width) == ("80x48", 2, 0, 48, 80)
    assert index_time_ids(index.set_index("id").loc[["person/p1"]]).tolist() == [[300, 451, 2, 0, 48, 80]]

    monkeypatch.setattr(latents_module, "load_encoders", lambda *a, **k: pytest.fail("a model was loaded"))
    again = latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    assert (again.processed, again.reused) == (0, 7)  # a second run caches nothing new

    two = _bucketed_settings(prepare_settings, 2)
    monkeypatch.undo()
    more = latents_stage(manifest, two, ws, ws.hashes(), device="cpu")
    assert (more.processed, more.reused) == (3, 7)  # only the new variation of the 3 person photos
    index = read_latents_index(ws.latents_index)
    assert len(index) == 3 * 2 + 4 and set(index["image_variation"]) == {0, 1}
    for item in ("person/p0", "person/p1", "person/p2"):
        v0, v1 = (index[(index["id"] == item) & (index["image_variation"] == v)]["latent_path"].item() for v in (0, 1))
        assert not torch.equal(load_file(v0)["latent"], load_file(v1)["latent"])
    even, odd = epoch_rows(index, 0), epoch_rows(index, 1)
    assert len(even) == len(odd) == 7 and set(even.loc[["person/p0"], "image_variation"]) == {0}
    assert odd.at["person/p0", "image_variation"] == 1 and odd.at["reg/r0", "image_variation"] == 0
    extra = json.loads(more.table.read_text())["extra"]
    assert extra["text_processed"] == 0  # captions did not change


def test_pad_mode_time_ids_are_the_padded_square_unless_original_is_asked(prepare_settings):
    settings = prepare_settings()
    ws, manifest = _manifest(settings)
    latents_stage(manifest, settings, ws, ws.hashes(), device="cpu")
    index = read_latents_index(ws.latents_index)
    assert len(index) == 7 and set(index["bucket"]) == {"64x64"} and set(index["image_variation"]) == {0}
    # OneTrainer's pre-padded files and every inference client: (T, T, 0, 0, T, T) for every image.
    assert index_time_ids(index).tolist() == [[64, 64, 0, 0, 64, 64]] * 7
    original = settings.model_copy(update={"resize": settings.resize.model_copy(update={"pad_time_ids": "original"})})
    again = latents_stage(manifest, original, ws, ws.hashes(), device="cpu")
    assert again.processed == 0  # the cached latents stay; only latents.csv changes
    index = read_latents_index(ws.latents_index).set_index("id")
    rows = read_manifest(ws.manifest, ws).set_index("id")
    p1 = index.loc["person/p1"]  # the photo's size and the manifest's paste offset, as train_data reads them
    assert (p1.crop_top, p1.crop_left) == (rows.at["person/p1", "offset_top"], rows.at["person/p1", "offset_left"])
    assert (p1.original_height, p1.original_width) == (rows.at["person/p1", "original_height"],
                                                       rows.at["person/p1", "original_width"])
    assert (p1.original_height, p1.original_width) != (64, 64)
