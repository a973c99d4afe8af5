"""Stage 3, masks: a head mask per prepared image with CLIPSeg, OneTrainer's algorithm.

For each image the prompts' probabilities (sigmoid of the logits) are averaged, smoothed with a
box blur of radius `smooth` at model resolution (352 x 352), resized to the image (bilinear),
thresholded (`> threshold`), expanded by `expand` pixels (a box dilation) and multiplied by
`alpha`. Written as `<stem>-masklabel.png` (L, 0..255, the image's size) beside the prepared image.

Which images: concepts with masks on (`concept.masks`, default the subject) when
`settings.masks.enabled`. Mode `fill` (the default, as OneTrainer's mask tool) keeps a mask the
user drew (`<stem>-masklabel.png` beside the original, scaled, fit and padded by the resize stage)
and segments only the others; `replace` always segments. The summary says how many drawn masks
were kept, how many were generated (and, in replace mode, how many drawn ones were ignored). A concept with masks off keeps a user's mask if there is one and has none
otherwise. Masks covering less than 0.5 % or more than 95 % of the image are flagged.

Table rows: id, mask (path or None), mask_hash, mask_origin ("clipseg" / "user" / None), coverage.

    result = masks_stage(resize_result, settings.masks, settings.concepts, ws, index, device="cpu")
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from likeness.content import HashIndex, bytes_digest, digest_parts, model_fingerprint
from likeness.files import write_atomic
from likeness.settings import Concept, MaskSettings
from likeness.stages import ItemRecords, Progress, Row, StageResult, load_rows, map_cached, write_table
from likeness.tasks.common import StagePolicy, progress
from likeness.tasks.resize import encode
from likeness.workspace import Workspace

if TYPE_CHECKING:  # torch is imported where tensors are made: a cached run does not pay for it
    import torch

MASKS_VERSION = 1
EMPTY_BELOW, FULL_ABOVE = 0.005, 0.95  # coverage outside these is flagged in the report


def clipseg_probabilities(model, processor, images: list[Image.Image], prompts: list[str],
                          device: torch.device) -> torch.Tensor:
    """Mean over prompts of sigmoid(logits): (B, 1, h, w) at the model's resolution."""
    import torch

    pairs = [image for image in images for _ in prompts]
    inputs = processor(text=prompts * len(images), images=pairs, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**inputs).logits  # (B*P, h, w); B*P = 1 may come squeezed to (h, w)
    probs = torch.sigmoid(logits.float()).reshape(len(images), len(prompts), *logits.shape[-2:])
    return probs.mean(dim=1, keepdim=True).cpu()


def refine(probs: torch.Tensor, size: tuple[int, int], settings: MaskSettings) -> torch.Tensor:
    """(B, 1, h, w) probabilities -> (B, 1, H, W) masks in {0, alpha}: smooth, resize, threshold, expand."""
    import torch.nn.functional as F

    if settings.smooth > 0:
        k = 2 * settings.smooth + 1
        probs = F.avg_pool2d(probs, k, stride=1, padding=settings.smooth, count_include_pad=False)
    probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    mask = (probs > settings.threshold).float()
    if settings.expand > 0:  # a box dilation, separable: rows then columns (2k instead of k^2 per pixel)
        k, e = 2 * settings.expand + 1, settings.expand
        mask = F.max_pool2d(F.max_pool2d(mask, (1, k), stride=1, padding=(0, e)), (k, 1), stride=1, padding=(e, 0))
    return mask * settings.alpha


def segment(images: list[Image.Image], model, processor, settings: MaskSettings,
                  device: torch.device) -> list[np.ndarray]:
    """uint8 (H, W) masks, one per image, each at its image's size (bucketed images differ)."""
    probs = clipseg_probabilities(model, processor, images, list(settings.prompts), device)  # (B, 1, h, w)
    masks = [refine(p[None], image.size[::-1], settings)[0, 0] for p, image in zip(probs, images, strict=True)]
    return [np.round(m.numpy() * 255).astype(np.uint8) for m in masks]


def coverage(mask: np.ndarray) -> float:
    return float((mask > 0).mean())


# --- the stage -------------------------------------------------------------------------------


def item_settings(settings: MaskSettings, fingerprint: str) -> dict:
    """What changes a generated mask (not batch size or mode)."""
    keyed = settings.model_dump(mode="json", include={"prompts", "threshold", "smooth", "expand", "alpha"})
    return {**keyed, "model": fingerprint}


def plan(row: Row, concept: Concept, settings: MaskSettings) -> str:
    """'clipseg', 'user' or 'none' for one image."""
    if settings.enabled and concept.masks:
        return "user" if settings.mode == "fill" and row.get("user_mask") else "clipseg"
    return "user" if row.get("user_mask") else "none"


def masks_key(resize: StageResult, masks: MaskSettings, concepts: list[Concept], ws: Workspace) -> str:
    index = ws.hashes()
    fingerprint = model_fingerprint(masks.model, index)
    index.save()
    plans = {c.name: (c.masks, masks.enabled, masks.mode) for c in concepts}
    return digest_parts("masks", MASKS_VERSION, resize.table_digest, item_settings(masks, fingerprint), plans)


def masks_stage(resize: StageResult, settings: MaskSettings, concepts: list[Concept], ws: Workspace,
                index: HashIndex, device: str = "auto", progress: Progress | None = None) -> StageResult:
    """A mask per image as its concept asks; CLIPSeg loads only if some image needs segmenting."""
    rows = load_rows(resize, ws)
    by_name = {c.name: c for c in concepts}
    for row in rows:
        row["plan"] = plan(row, by_name[row["concept"]], settings)
    needs_model = any(row["plan"] == "clipseg" for row in rows)
    keyed = item_settings(settings, model_fingerprint(settings.model, index) if needs_model else "")
    model = cache(lambda: load_model(settings.model, device))

    def key(row: Row) -> str:
        depends = {"clipseg": (row["prepared_hash"], keyed), "user": row["user_mask_hash"], "none": None}
        return digest_parts(MASKS_VERSION, row["id"], row["plan"], depends[row["plan"]])

    def compute(batch: list[Row]) -> list[Row]:
        return [_one(row, mask, ws, index) for row, mask in zip(batch, _segment(batch, model, settings), strict=True)]

    done, counts = map_cached(rows, key, compute, ItemRecords(ws.item_records("masks"), index, ws),
                              batch_size=settings.batch_size, progress=progress)
    table = [{"id": row["id"], **out} for row, out in zip(rows, done, strict=True)]
    report, flagged = _report(table, ws)
    origins = mask_origins(rows)
    write_atomic(ws.report("masks-report.md"), report)
    result = write_table(ws, "masks", MASKS_VERSION, table, counts,
                         extra={"flagged": flagged, "report": report, **origins, "summary": origins_summary(origins)})
    index.save()
    return result


def is_flagged(row: Row) -> bool:
    """A generated mask that covers almost nothing or almost everything."""
    return row["mask_origin"] == "clipseg" and not EMPTY_BELOW <= row["coverage"] <= FULL_ABOVE


def mask_origins(rows: list[Row]) -> dict[str, int]:
    """How many drawn masks are kept, generated, ignored (replace mode) and images left without one."""
    return {"kept": sum(row["plan"] == "user" for row in rows),
            "generated": sum(row["plan"] == "clipseg" for row in rows),
            "ignored": sum(row["plan"] == "clipseg" and bool(row.get("user_mask")) for row in rows),
            "without": sum(row["plan"] == "none" for row in rows)}


def origins_summary(origins: dict[str, int]) -> str:
    text = (f"masks: {origins['kept']} drawn by you kept, {origins['generated']} generated by CLIPSeg, "
            f"{origins['without']} image(s) without a mask")
    if origins["ignored"]:
        text += f"; {origins['ignored']} drawn mask(s) ignored because masks.mode = 'replace' (set it to 'fill' to keep them)"
    return text


def _report(table: list[Row], ws: Workspace) -> tuple[str, int]:
    """Markdown listing generated masks that cover almost nothing or almost everything (paths as records write them)."""
    flagged = [f"- `{ws.relative(r['mask'])}`: covers {r['coverage']:.1%} of the image" for r in table if is_flagged(r)]
    if not flagged:
        return "# Masks\n\nNo mask flagged.\n", 0
    lines = [f"{len(flagged)} mask(s) look wrong (empty or almost everything); check them:", "", *flagged]
    return "# Masks\n\n" + "\n".join(lines) + "\n", len(flagged)


def load_model(name: str, device: str) -> tuple[object, object, torch.device]:
    from likeness.models.devices import resolve_device
    from likeness.models.loading import load_clipseg

    resolved = resolve_device(device)
    model, processor = load_clipseg(name)
    return model.to(resolved), processor, resolved


def _segment(batch: list[Row], model: Callable[[], tuple], settings: MaskSettings) -> list[np.ndarray | None]:
    """Masks for the batch's 'clipseg' rows (None for the others); the model loads on first need."""
    wanted = [i for i, row in enumerate(batch) if row["plan"] == "clipseg"]
    out: list[np.ndarray | None] = [None] * len(batch)
    if wanted:
        clipseg, processor, device = model()
        images = [Image.open(batch[i]["prepared"]).convert("RGB") for i in wanted]
        for i, mask in zip(wanted, segment(images, clipseg, processor, settings, device), strict=True):
            out[i] = mask
    return out


def _one(row: Row, mask: np.ndarray | None, ws: Workspace, index: HashIndex) -> Row:
    if row["plan"] == "none":
        return {"mask": None, "mask_hash": None, "mask_origin": None, "coverage": None, "outputs": {}}
    target = ws.prepared_mask(row["concept"], row["stem"])
    if row["plan"] == "user":
        data = Path(row["user_mask"]).read_bytes()
        value = coverage(np.asarray(Image.open(row["user_mask"])))
    else:
        data, value = encode(Image.fromarray(mask, "L"), "png"), coverage(mask)
    digest = bytes_digest(data)
    write_atomic(target, data)
    index.remember(target, digest)
    return {"mask": str(target), "mask_hash": digest, "mask_origin": row["plan"], "coverage": value,
            "outputs": {str(target): digest}}


# --- what a UI user looks at ----------------------------------------------------------------

SHEET_TINT, SHEET_FLAG = (0, 200, 255), (230, 30, 30)


def mask_sheet(items: list[tuple[str, Path, Path, bool]], thumb: int = 128, columns: int = 6) -> bytes:
    """A JPEG contact sheet: each (label, prepared image, mask, flagged) as a thumbnail with its mask
    tinted cyan; a flagged mask gets a red frame and a '!' before its label."""
    columns, label_height = max(1, min(columns, len(items))), 14
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * (thumb + 4) + 4, rows * (thumb + label_height + 4) + 4), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for i, (label, image_path, mask_path, flagged) in enumerate(items):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            tile = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
            alpha = mask.convert("L").resize(tile.size).point(lambda v: v * 115 // 255)  # 45 % tint at 255
        tile.paste(Image.new("RGB", tile.size, SHEET_TINT), (0, 0), alpha)
        x, y = 4 + (i % columns) * (thumb + 4), 4 + (i // columns) * (thumb + label_height + 4)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        if flagged:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=SHEET_FLAG, width=3)
        draw.text((x + 2, y + thumb + 1), ("! " if flagged else "") + label[-22:],
                  fill=SHEET_FLAG if flagged else (220, 220, 220))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def overlays_markdown(resize: StageResult, result: StageResult, ws: Workspace, limit: int = 120) -> str | None:
    """The `mask-overlays` artifact: the contact sheet of every mask, inline (None: no masks)."""
    prepared = {row["id"]: row["prepared"] for row in load_rows(resize, ws)}
    rows = [row for row in load_rows(result, ws) if row["mask"]]
    if not rows:
        return None
    shown = sorted(rows, key=lambda r: not is_flagged(r))[:limit]  # flagged first, so none is cut off
    sheet = mask_sheet([(r["id"], Path(prepared[r["id"]]), Path(r["mask"]), is_flagged(r)) for r in shown],
                       thumb=128 if len(shown) <= 48 else 96)
    flags = sum(is_flagged(r) for r in rows)
    more = f" ({len(rows) - len(shown)} more not shown)" if len(rows) > len(shown) else ""
    return (f"# Masks\n\n{len(rows)} mask(s){more}, tinted cyan over the prepared image; "
            f"{flags} flagged (red frame, '!': empty or almost everything).\n\n"
            f"![mask overlays](data:image/jpeg;base64,{base64.b64encode(sheet).decode('ascii')})\n")


# --- Prefect task ----------------------------------------------------------------------------


@task(name="compute-masks", cache_policy=StagePolicy(key_fn=masks_key))
def compute_masks(resize: StageResult, masks: MaskSettings, concepts: list[Concept], ws: Workspace,
                  device: str = "auto") -> StageResult:
    """`<stem>-masklabel.png` beside each prepared image of a concept with masks; flags odd masks."""
    result = masks_stage(resize, masks, concepts, ws, ws.hashes(), device, progress("masks"))
    extra = json.loads(result.table.read_text())["extra"]
    create_markdown_artifact(extra["report"], key="masks-report", description="Masks that look empty or full")
    overlays = overlays_markdown(resize, result, ws)
    if overlays:
        create_markdown_artifact(overlays, key="mask-overlays", description="Each photo with its mask tinted; flagged ones framed red")
    logger = get_run_logger()
    if extra["flagged"]:
        logger.warning("%d mask(s) look empty or cover almost everything: see %s", extra["flagged"], ws.report("masks-report.md"))
    logger.info(extra["summary"])
    logger.info(result.summary())
    return ws.portable(result)
