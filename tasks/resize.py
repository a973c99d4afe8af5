"""Stage 2, resize: every image fit inside resolution x resolution and padded to exactly that.

The geometry of `mogrify -resize TxT -background white -gravity center -extent TxT`: scale
(up or down) so the longer side is T keeping the aspect ratio, sides rounded half up
(floor(side x scale + 0.5), as ImageMagick), then paste centred on the background colour at
ImageMagick's `-gravity center` offset T // 2 - side // 2 (for an odd T - side that is one pixel
more than (T - side) // 2: 1024 - 767 puts the photo at 129, not 128). Before that, EXIF orientation is
applied and every colour mode becomes RGB (transparency composited on the background, 16-bit
scaled to 8-bit, CMYK / P / LA / 1 / greyscale converted). JPEGs are decoded at 1/2, 1/4 or 1/8
scale in the DCT domain when the target allows (`Image.draft`), then resampled with Lanczos.

With `resize.mode = "bucket"` an image is instead scaled (Lanczos) to cover its aspect-ratio bucket
(likeness/buckets.py) and kept uncropped, so the latent stage can crop it per variation (centred,
or jittered); the row records the bucket and the centred crop's offset.

Outputs go to `workspace/prepared/<concept>/<stem>.png` (lossless; never in place). An image
already T x T, RGB, unrotated PNG/JPEG/WebP is copied byte for byte instead (no re-encoding),
keeping its extension. A mask the user drew beside the image is fit and padded (black) the same
way into `workspace/prepare/user-masks/`.

Table rows add: prepared, prepared_hash, resolution, width/height and bucket (`WxH`): the training
size (T x T when padding; the prepared image itself is scaled_width x scaled_height in bucket mode), original_width/height (after orientation),
scaled_width/height, offset_left/top (pad: the paste offset; bucket: the centred crop's offset),
user_mask(_hash).

    result = resize_stage(scan_result, settings.resize, ws, ws.hashes())
"""

from __future__ import annotations

import io
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps
from prefect import get_run_logger, task

from likeness.buckets import assign
from likeness.content import HashIndex, bytes_digest, digest_parts
from likeness.files import atomic_path, write_atomic
from likeness.settings import ResizeSettings
from likeness.stages import (ItemRecords, PrepareError, Progress, Row, StageResult, load_rows, map_cached,
                                     write_table)
from likeness.tasks.common import StagePolicy, progress
from likeness.tasks.scan import ROTATING_ORIENTATIONS, register_readers
from likeness.workspace import Workspace

RESIZE_VERSION = 3  # 2: bucket mode, width/height/bucket in the rows; 3: ImageMagick's pad offset
PNG_COMPRESS_LEVEL = 1  # lossless either way; at 1024 px level 1 takes ~0.1 s, level 6 ~0.4 s, for ~15% more bytes
COPYABLE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",)}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CARRIED = ("id", "concept", "stem", "source", "source_hash", "caption_source", "caption_source_hash")


@dataclass(frozen=True)
class Placement:
    """Where the scaled image sits on the target x target canvas."""

    width: int
    height: int
    left: int
    top: int
    target: int


def fit_inside(width: int, height: int, target: int) -> Placement:
    """ImageMagick's `-resize TxT` then `-gravity center -extent TxT` (checked against `convert` 6.9)."""
    scale = min(target / width, target / height)
    scaled_w = min(target, max(1, math.floor(width * scale + 0.5)))
    scaled_h = min(target, max(1, math.floor(height * scale + 0.5)))
    # ImageMagick centres with integer halves of each side (GravityAdjustGeometry), not half the difference.
    return Placement(scaled_w, scaled_h, target // 2 - scaled_w // 2, target // 2 - scaled_h // 2, target)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited on `background`."""
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit greyscale: 65535 -> 255 (Pillow would clip)
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # float greyscale: 0..1 when it fits, else 0..255
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise PrepareError(f"colour mode {image.mode} cannot be converted to RGB ({exc}): save the image as RGB") from None


def load_oriented(path: Path, placement_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, decode (JPEG at a reduced scale no smaller than `placement_size`), apply EXIF orientation."""
    with Image.open(path) as image:
        if placement_size:
            w, h = placement_size
            if image.getexif().get(0x0112, 1) in ROTATING_ORIENTATIONS:
                w, h = h, w
            image.draft(image.mode, (w, h))
        image.load()
        return ImageOps.exif_transpose(image)


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header."""
    with Image.open(path) as probe:
        w, h = probe.size
        return (h, w) if probe.getexif().get(0x0112, 1) in ROTATING_ORIENTATIONS else (w, h)


def prepare_image(path: Path, target: int, background: str = "white") -> tuple[Image.Image, tuple[int, int], Placement]:
    """The prepared RGB image, the original (oriented) size and where it was pasted."""
    color = ImageColor.getrgb(background)[:3]
    w, h = oriented_size(path)
    placement = fit_inside(w, h, target)
    image = to_rgb(load_oriented(path, (placement.width, placement.height)), color)
    if image.size != (placement.width, placement.height):
        image = image.resize((placement.width, placement.height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (target, target), color)
    canvas.paste(image, (placement.left, placement.top))
    return canvas, (w, h), placement


def prepare_cover(path: Path, resolution: int, quantization: int = 64,
                  background: str = "white") -> tuple[Image.Image, tuple[int, int], Row]:
    """Bucket mode: the RGB image scaled to cover its bucket (uncropped), its original size, its geometry."""
    w, h = oriented_size(path)
    bucket, cover, (left, top) = assign(w, h, resolution, quantization)
    image = to_rgb(load_oriented(path, cover), ImageColor.getrgb(background)[:3])
    if image.size != cover:
        image = image.resize(cover, Image.Resampling.LANCZOS, reducing_gap=3.0)
    geometry = {"width": bucket.width, "height": bucket.height, "bucket": bucket.key, "scaled_width": cover[0],
                "scaled_height": cover[1], "offset_left": left, "offset_top": top}
    return image, (w, h), geometry


def scale_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A user's mask as L, resized (bilinear) to `size`."""
    mask = load_oriented(path)
    mask = mask.convert("L") if mask.mode not in SIXTEEN_BIT_MODES else to_rgb(mask).convert("L")
    return mask.resize(size, Image.Resampling.BILINEAR)


def fit_mask(path: Path, placement: Placement) -> Image.Image:
    """A user's mask resized like its image and padded with 0 (nothing outside the photo)."""
    mask = scale_mask(path, (placement.width, placement.height))
    canvas = Image.new("L", (placement.target, placement.target), 0)
    canvas.paste(mask, (placement.left, placement.top))
    return canvas


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True, quality=0, method=0)  # least effort: as fast as PNG level 1
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def copyable(path: Path, target: int) -> bool:
    """Already target x target, RGB, unrotated, in a format we keep as is."""
    with Image.open(path) as image:
        return (image.size == (target, target) and image.mode == "RGB" and "transparency" not in image.info
                and image.format in COPYABLE_FORMATS and path.suffix.lower() in COPYABLE_FORMATS[image.format]
                and image.getexif().get(0x0112, 1) == 1)


# --- the stage -------------------------------------------------------------------------------


def item_settings(settings: ResizeSettings) -> dict:
    """The settings that change a prepared image (min_side only warns)."""
    return settings.model_dump(mode="json", include={"resolution", "background", "image_format", "mode",
                                                     "bucket_quantization"})


def resize_key(scan: StageResult, resize: ResizeSettings, ws: Workspace) -> str:
    return digest_parts("resize", RESIZE_VERSION, scan.table_digest, item_settings(resize))


def resize_one(row: Row, settings: ResizeSettings, ws: Workspace, index: HashIndex) -> Row:
    if settings.mode == "bucket":
        return _resize_to_bucket(row, settings, ws, index)
    source, target = Path(row["source"]), settings.resolution
    if copyable(source, target):
        prepared = ws.prepared_image(row["concept"], row["stem"], source.suffix.lower())
        with atomic_path(prepared) as tmp:
            shutil.copyfile(source, tmp)
        digest, original, placement = row["source_hash"], (target, target), fit_inside(target, target, target)
    else:
        image, original, placement = prepare_image(source, target, settings.background)
        prepared = ws.prepared_image(row["concept"], row["stem"], f".{settings.image_format}")
        data = encode(image, settings.image_format)
        digest = bytes_digest(data)
        write_atomic(prepared, data)
    index.remember(prepared, digest)
    out = {"prepared": str(prepared), "prepared_hash": digest, "resolution": target,
           "width": target, "height": target, "bucket": f"{target}x{target}",
           "original_width": original[0], "original_height": original[1],
           "scaled_width": placement.width, "scaled_height": placement.height,
           "offset_left": placement.left, "offset_top": placement.top,
           "user_mask": None, "user_mask_hash": None, "outputs": {str(prepared): digest}}
    if row.get("mask_source"):
        mask_path = ws.user_mask(row["concept"], row["stem"])
        data = encode(fit_mask(Path(row["mask_source"]), placement), "png")
        write_atomic(mask_path, data)
        index.remember(mask_path, bytes_digest(data))
        out.update(user_mask=str(mask_path), user_mask_hash=bytes_digest(data))
        out["outputs"][str(mask_path)] = bytes_digest(data)
    return out


def _resize_to_bucket(row: Row, settings: ResizeSettings, ws: Workspace, index: HashIndex) -> Row:
    image, original, geometry = prepare_cover(Path(row["source"]), settings.resolution, settings.bucket_quantization,
                                              settings.background)
    prepared = ws.prepared_image(row["concept"], row["stem"], f".{settings.image_format}")
    data = encode(image, settings.image_format)
    write_atomic(prepared, data)
    index.remember(prepared, bytes_digest(data))
    out = {"prepared": str(prepared), "prepared_hash": bytes_digest(data), "resolution": settings.resolution,
           "original_width": original[0], "original_height": original[1], **geometry,
           "user_mask": None, "user_mask_hash": None, "outputs": {str(prepared): bytes_digest(data)}}
    if row.get("mask_source"):
        mask_path = ws.user_mask(row["concept"], row["stem"])
        mask = encode(scale_mask(Path(row["mask_source"]), image.size), "png")
        write_atomic(mask_path, mask)
        index.remember(mask_path, bytes_digest(mask))
        out.update(user_mask=str(mask_path), user_mask_hash=bytes_digest(mask))
        out["outputs"][str(mask_path)] = bytes_digest(mask)
    return out


def resize_stage(scan: StageResult, settings: ResizeSettings, ws: Workspace, index: HashIndex,
                 progress: Progress | None = None, workers: int = 2) -> StageResult:
    """Prepare every scanned image; images whose content and settings are unchanged are reused."""
    register_readers()  # HEIC; the scan already reported very large photos
    rows = load_rows(scan, ws)
    records = ItemRecords(ws.item_records("resize"), index, ws)
    keyed = item_settings(settings)

    def key(row: Row) -> str:
        return digest_parts(RESIZE_VERSION, row["id"], row["source_hash"], row.get("mask_source_hash"), keyed)

    with ThreadPoolExecutor(workers) as pool:
        done, counts = map_cached(
            rows, key, lambda batch: list(pool.map(lambda r: resize_one(r, settings, ws, index), batch)),
            records, batch_size=2 * workers, progress=progress)
    table = [{**{k: row.get(k) for k in CARRIED}, **out} for row, out in zip(rows, done, strict=True)]
    result = write_table(ws, "resize", RESIZE_VERSION, table, counts)
    index.save()
    return result


# --- Prefect task ----------------------------------------------------------------------------


@task(name="resize-images", cache_policy=StagePolicy(key_fn=resize_key))
def resize_images(scan: StageResult, resize: ResizeSettings, ws: Workspace, workers: int = 2) -> StageResult:
    """Prepared RGB images in the workspace; only photos whose content changed are redone."""
    result = resize_stage(scan, resize, ws, ws.hashes(), progress("resize"), workers)
    get_run_logger().info(result.summary())
    return ws.portable(result)
