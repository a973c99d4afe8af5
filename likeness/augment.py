"""Image and caption augmentations, one seeded draw per (seed, item, variation): OneTrainer's
concept.image / concept.text options, baked into each cached variation.

An image variation is made from the prepared image (and its mask) in this order, as OneTrainer's
data pipeline does: mask rotate-crop -> scale to cover the target and crop it (centred, or at a
random offset with crop jitter) -> flip -> rotate -> brightness, contrast, saturation, hue ->
circular mask shrink. Geometric steps move the mask with its image; colour steps touch the
image only. `random` draws the strength uniformly in [-max, max] (factors 1 +- max, clamped at 0;
flip: half the variations), `fixed` always applies the max. Epoch e trains on image variation
e % image_variations and text variation e % text_variations (OneTrainer's variation cycling).

Tag shuffle happens at caption time, once per text variation (see tasks/captions.py): the
caption a variation holds is fixed, so frozen text encoders' outputs stay cacheable per caption,
and both encoders always see the same text. More variations give more orders.

    rng = variation_rng(seed=42, item="person/p0", variation=1)
    out = augment(image, mask, concept.augmentations, Bucket(1152, 896), rng)
    out.image, out.mask, out.crop_left, out.crop_top
    shuffle_tags("ohwx man, smiling, outdoors", ",", keep=1, rng=variation_rng(42, "person/p0", 0, "tags"))
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from likeness.buckets import Bucket, centre_crop, cover_size, jittered_crop
from likeness.settings import ImageAugmentations

MASK_ROTATE_MAX_ANGLE = 20.0  # degrees, as OneTrainer's RandomMaskRotateCrop is configured
MASK_PADDING_PERCENT = (10.0, 30.0)  # padding around the mask's box, drawn per side
MASK_SHRINK_FACTOR = (0.2, 1.0)  # disc radius as a fraction of the farthest masked pixel
COLOURS = ("brightness", "contrast", "saturation")


@dataclass
class Augmented:
    """One image variation: RGB image and L mask (or None) of the target size, and where the crop sat."""

    image: Image.Image
    mask: Image.Image | None
    crop_left: int
    crop_top: int


def variation_rng(seed: int, item: str, variation: int, purpose: str = "image") -> random.Random:
    """The generator of one (seed, item, variation): the same draws in every process and run."""
    return random.Random(f"likeness-{purpose}:{seed}:{item}:{variation}")  # str seeds are hashed with SHA-512


def is_active(aug: ImageAugmentations) -> bool:
    """Whether any augmentation changes the image (then it is part of the cache key)."""
    toggles = [aug.flip, aug.rotate, *(getattr(aug, name) for name in (*COLOURS, "hue"))]
    return any(t != "off" for t in toggles) or aug.crop_jitter or aug.mask_rotate_crop or aug.circular_mask_shrink


def is_random(aug: ImageAugmentations) -> bool:
    """Whether variations of one image differ (then the seed, item and variation are part of the key)."""
    toggles = [aug.flip, aug.rotate, *(getattr(aug, name) for name in (*COLOURS, "hue"))]
    return any(t == "random" for t in toggles) or aug.crop_jitter or aug.mask_rotate_crop or aug.circular_mask_shrink


def augment(image: Image.Image, mask: Image.Image | None, aug: ImageAugmentations, target: Bucket,
            rng: random.Random, fill: tuple[int, int, int] = (255, 255, 255)) -> Augmented:
    """The variation of `image` (and `mask`) that `rng` draws, cropped to `target`."""
    if mask is not None and mask.size != image.size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} but its image is {image.size[0]}x{image.size[1]}")
    if aug.mask_rotate_crop and mask is not None:
        image, mask = mask_rotate_crop(image, mask, rng, fill)
    image, mask, (left, top) = crop_to(image, mask, target, rng if aug.crop_jitter else None)
    if aug.flip == "fixed" or (aug.flip == "random" and rng.random() < 0.5):
        image, mask = ImageOps.mirror(image), None if mask is None else ImageOps.mirror(mask)
    angle = _strength(aug.rotate, aug.rotate_max_angle, rng)
    if angle:
        image = image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=fill)
        mask = None if mask is None else mask.rotate(angle, Image.Resampling.BILINEAR, fillcolor=0)
    image = adjust_colours(image, aug, rng)
    if aug.circular_mask_shrink and mask is not None:
        mask = circular_shrink(mask, rng)
    return Augmented(image, mask, left, top)


def _strength(toggle: str, max_strength: float, rng: random.Random) -> float:
    """0 when off; max when fixed; uniform in [-max, max] when random."""
    if toggle == "fixed":
        return max_strength
    return rng.uniform(-max_strength, max_strength) if toggle == "random" else 0.0


def crop_to(image: Image.Image, mask: Image.Image | None, target: Bucket,
            jitter: random.Random | None) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """Scale to cover `target` (a no-op for prepared images), crop it; returns the crop's (left, top)."""
    cover = cover_size(*image.size, target)
    if cover != image.size:
        image = image.resize(cover, Image.Resampling.LANCZOS)
        mask = None if mask is None else mask.resize(cover, Image.Resampling.BILINEAR)
    left, top = jittered_crop(cover, target, jitter) if jitter else centre_crop(cover, target)
    box = (left, top, left + target.width, top + target.height)
    return image.crop(box), None if mask is None else mask.crop(box), (left, top)


def adjust_colours(image: Image.Image, aug: ImageAugmentations, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation as factors 1 + strength (>= 0), then a hue shift."""
    enhancers = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                 "saturation": ImageEnhance.Color}
    for name in COLOURS:
        toggle = getattr(aug, name)
        if toggle != "off":
            factor = max(0.0, 1.0 + _strength(toggle, getattr(aug, f"{name}_max_strength"), rng))
            image = enhancers[name](image).enhance(factor)
    shift = _strength(aug.hue, aug.hue_max_strength, rng)
    return shift_hue(image, shift) if shift else image


def shift_hue(image: Image.Image, turns: float) -> Image.Image:
    """Rotate every pixel's hue by `turns` of the colour circle (Pillow's 8-bit HSV)."""
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(turns * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the pixels > 0.5; the whole image when none are."""
    ys, xs = np.nonzero(mask > 0.5)
    if len(xs) == 0:
        return 0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def mask_rotate_crop(image: Image.Image, mask: Image.Image, rng: random.Random,
                     fill: tuple[int, int, int]) -> tuple[Image.Image, Image.Image]:
    """Rotate both around the mask's centre (up to 20 degrees), crop to the mask's box padded 10-30 % a side."""
    left, top, right, bottom = _mask_box(np.asarray(mask, dtype=np.float32) / 255.0)
    centre, angle = ((left + right) / 2, (top + bottom) / 2), rng.uniform(-MASK_ROTATE_MAX_ANGLE, MASK_ROTATE_MAX_ANGLE)
    image = image.rotate(angle, Image.Resampling.BILINEAR, center=centre, fillcolor=fill)
    mask = mask.rotate(angle, Image.Resampling.BILINEAR, center=centre, fillcolor=0)
    left, top, right, bottom = _mask_box(np.asarray(mask, dtype=np.float32) / 255.0)
    lo, hi = (p / 100 for p in MASK_PADDING_PERCENT)
    pad_w = [(right - left) * (1 / (1 - rng.uniform(lo, hi)) - 1) / 2 for _ in range(2)]
    pad_h = [(bottom - top) * (1 / (1 - rng.uniform(lo, hi)) - 1) / 2 for _ in range(2)]
    box = _inside((left - pad_w[0], top - pad_h[0], right + pad_w[1], bottom + pad_h[1]), image.size)
    return image.crop(box), mask.crop(box)


def _inside(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box moved back inside the image (keeping its size where it fits), as whole pixels >= 8 a side."""
    left, top, right, bottom = box
    dx = max(0.0, -left) - max(0.0, right - size[0])
    dy = max(0.0, -top) - max(0.0, bottom - size[1])
    left, right = max(0, math.floor(left + dx)), min(size[0], math.ceil(right + dx))
    top, bottom = max(0, math.floor(top + dy)), min(size[1], math.ceil(bottom + dy))
    return left, top, max(right, min(size[0], left + 8)), max(bottom, min(size[1], top + 8))


def circular_shrink(mask: Image.Image, rng: random.Random) -> Image.Image:
    """Keep the mask inside a disc around a random masked pixel, radius 20-100 % of its farthest masked pixel."""
    values = np.asarray(mask, dtype=np.float32) / 255.0  # (H, W)
    ys, xs = np.nonzero(values > 0)
    if len(xs) == 0:
        return mask
    pick = rng.randrange(len(xs))
    yy, xx = np.mgrid[:values.shape[0], :values.shape[1]]
    distance = np.hypot(yy - ys[pick], xx - xs[pick])
    radius = rng.uniform(*MASK_SHRINK_FACTOR) * distance[values > 0].max()
    return Image.fromarray(np.round(values * (distance <= radius) * 255).astype(np.uint8), "L")


# --- captions --------------------------------------------------------------------------------


def shuffle_tags(caption: str, delimiter: str, keep: int, rng: random.Random) -> str:
    """The caption's tags (split on `delimiter`, stripped, empty ones dropped) with all but the
    first `keep` shuffled, joined with ', ' (OneTrainer's ShuffleTags)."""
    tags = [tag.strip() for tag in caption.split(delimiter) if tag.strip()]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
