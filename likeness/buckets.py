"""Aspect-ratio buckets: OneTrainer's bucket set, nearest-ratio assignment, scale to cover, crop.

For a target resolution T the buckets are the ratios (h:w) 1:1, 1:1.25, 1:1.5, 1:1.75, 1:2, 1:2.5,
1:3, 1:3.5, 1:4 and their transposes, each scaled to an area of T^2 and rounded to multiples of
64 (Python's round, as mgds' AspectBucketing). For T = 1024, as (width, height):

    1024x1024  1152x896  1280x832  1344x768  1472x704  1600x640  1792x576  1920x576  2048x512

and the transposes. A photo goes to the bucket whose height/width ratio is nearest its own
(absolute difference of h/w). It is scaled (up or down) so it covers the bucket, the other side
rounded, then cropped to the bucket: centred, or at a random offset with crop jitter. The crop's
top-left is SDXL's `crop_top_left` time id; the bucket is the target size.

    bucket = nearest_bucket(4000, 3000, bucket_set(1024))   # Bucket(width=1152, height=896)
    cover = cover_size(4000, 3000, bucket)                   # (1195, 896): then crop 1152 wide
    left, top = centre_crop(cover, bucket)                   # (21, 0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

# (height, width) ratios, as OneTrainer lists them; transposes are added.
ASPECT_RATIOS = ((1.0, 1.0), (1.0, 1.25), (1.0, 1.5), (1.0, 1.75), (1.0, 2.0), (1.0, 2.5), (1.0, 3.0), (1.0, 3.5),
                 (1.0, 4.0))
QUANTIZATION = 64


class Bucket(NamedTuple):
    """A training size; `key` names it in the manifest (`WxH`)."""

    width: int
    height: int

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.height / self.width

    @classmethod
    def parse(cls, key: str) -> Bucket:
        """`"1152x896"` -> Bucket(1152, 896); a clear error for anything else."""
        try:
            width, height = (int(part) for part in key.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {key!r} is not of the form WIDTHxHEIGHT (e.g. '1152x896')") from None
        if width <= 0 or height <= 0:
            raise ValueError(f"bucket {key!r}: width and height must be > 0")
        return cls(width, height)


@cache
def bucket_set(resolution: int, quantization: int = QUANTIZATION) -> tuple[Bucket, ...]:
    """Every bucket for target `resolution`, sorted by aspect (tallest last), without duplicates."""
    if resolution < quantization:
        raise ValueError(f"resolution {resolution} is below the bucket quantization {quantization}")
    buckets = set()
    for h, w in ASPECT_RATIOS:
        scale = resolution / math.sqrt(h * w)  # same pixel count as resolution^2
        for bh, bw in ((h * scale, w * scale), (w * scale, h * scale)):
            buckets.add(Bucket(round(bw / quantization) * quantization, round(bh / quantization) * quantization))
    buckets = {b for b in buckets if b.width > 0 and b.height > 0}  # tiny resolutions round thin ones to 0
    return tuple(sorted(buckets, key=lambda b: (b.aspect, b.width)))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose height/width is nearest the image's (first of equals)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: width and height must be > 0")
    aspect = height / width
    return min(buckets, key=lambda b: abs(b.aspect - aspect))


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) scaled so the image covers the bucket; one side equals the bucket's."""
    if height / width > bucket.aspect:  # relatively taller: fit the width, crop the height
        return bucket.width, max(bucket.height, round(height * bucket.width / width))
    return max(bucket.width, round(width * bucket.height / height)), bucket.height


def centre_crop(cover: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """(left, top) of the centred bucket-sized crop of an image of size `cover`."""
    return (cover[0] - bucket.width) // 2, (cover[1] - bucket.height) // 2


def jittered_crop(cover: tuple[int, int], bucket: Bucket, rng: random.Random) -> tuple[int, int]:
    """(left, top) uniform over every crop that stays inside the image."""
    return rng.randint(0, cover[0] - bucket.width), rng.randint(0, cover[1] - bucket.height)


def assign(width: int, height: int, resolution: int,
           quantization: int = QUANTIZATION) -> tuple[Bucket, tuple[int, int], tuple[int, int]]:
    """The bucket, the cover size and the centre crop's (left, top) for a photo of this size."""
    bucket = nearest_bucket(width, height, bucket_set(resolution, quantization))
    cover = cover_size(width, height, bucket)
    return bucket, cover, centre_crop(cover, bucket)
