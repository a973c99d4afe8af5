"""Stage 1, scan + validate: list each concept's images and report every problem before heavy work.

Images are the files with an image extension (bmp, jpg, jpeg, png, tif, tiff, webp, avif as
OneTrainer, plus heic/heif, the iPhone's default, read with pillow-heif) that are not
`*-masklabel.*` / `*-condlabel.*` labels, sorted; `include_subdirectories` recurses, skipping
hidden and system files and folders (as OneTrainer does). Beside an image, `<stem>.txt` is its
caption and `<stem>-masklabel.png` a mask the user drew (any size of the photo's aspect ratio).

Errors (the flow stops, each naming the file and what to do): a missing folder, an empty concept,
zero-byte files, files that are not images, corrupt or unreadable images, photos above Pillow's
decompression-bomb limit (2 x `Image.MAX_IMAGE_PIXELS`, ~179 megapixels), two images with one
stem, a user mask of another aspect ratio than its photo, a missing caption file. Warnings (in the
report and the log): images smaller than `resize.min_side`, exact duplicates within or across
concepts, photos above Pillow's warning threshold (~89 megapixels), fewer than 5 subject photos,
photo formats likeness does not read (GIF, RAW), and once per concept, caption files its caption
source does not read. The report gives every file of each concept folder a verdict: used,
skipped and why, warning or error (tasks/scan_files.py).

The table (`workspace/prepare/scan.json`, written only when there is no error) has one row per
image: id, concept, stem, source, source_hash, width and height (after EXIF orientation), format,
mode, caption_source(_hash), mask_source(_hash). Every file is hashed, so the table is the content
fingerprint of the dataset.

    result, report = scan_stage(settings.concepts, settings.resize.min_side, ws, ws.hashes())
    report.raise_for_errors()
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pillow_heif
from PIL import Image, UnidentifiedImageError
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.content import HashIndex, digest_parts
from likeness.files import write_atomic
from likeness.settings import Concept
from likeness.stages import ItemRecords, Progress, Row, StageResult, load_rows, map_cached, write_table
from likeness.tasks.common import StagePolicy, progress
from likeness.tasks.scan_files import (IMAGE_EXTENSIONS, LABEL_SUFFIXES, file_verdicts, folder_entries,
                                       is_image_file)
from likeness.tasks.scan_report import DatasetError, Issue, ScanReport
from likeness.workspace import Workspace

__all__ = ["IMAGE_EXTENSIONS", "LABEL_SUFFIXES", "DatasetError", "ScanReport", "is_image_file"]  # re-exported
SCAN_VERSION = 2  # 2: heic/heif read, very large photos warned, a verdict for every file
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
FILES_LIMIT = 500  # files listed per concept in the Prefect artifact (the report file lists them all)
FEW_PHOTOS = 5  # fewer subject photos than this are warned about (the guide asks for 10 to 100)
ISSUE_ORDER = {"error": 0, "warning": 1}


def register_readers() -> None:
    """HEIC/HEIF through pillow-heif; Pillow's decompression-bomb warning silenced, as the scan reports
    those photos itself, naming each (idempotent)."""
    pillow_heif.register_heif_opener()
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


register_readers()


# --- listing ---------------------------------------------------------------------------------


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """A concept's images, sorted; recursion skips folders whose name starts with '.'."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if _file_or_link(p) and is_image_file(p))
    found = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts[:-1])
        if not hidden and _file_or_link(path) and is_image_file(path):
            found.append(path)
    return sorted(found)


def _file_or_link(path: Path) -> bool:
    """Files, and links even when broken (the scan reports those as unreadable)."""
    return path.is_file() or path.is_symlink()


def caption_sidecar(image: Path) -> Path:
    return image.with_suffix(".txt")


def mask_sidecar(image: Path) -> Path:
    return image.with_name(f"{image.stem}-masklabel.png")


def concept_folders(concept: Concept, ws: Workspace | None) -> list[tuple[Path, str]]:
    """(folder, id prefix) of a concept's images: its own folder, and its generated images if it has any."""
    from likeness.tasks.generate import GENERATED, generated_folder

    folders = [(Path(concept.path), "")]
    if concept.generate and ws is not None:
        folders.append((generated_folder(ws, concept.name), f"{GENERATED}/"))
    return folders


def concept_files(concept: Concept, ws: Workspace | None = None) -> list[Path]:
    """Images and sidecars of a concept; [] when its folder is missing (scan reports that)."""
    images = [image for folder, _ in concept_folders(concept, ws) if folder.is_dir()
              for image in list_images(folder, concept.include_subdirectories)]
    sidecars = [s for image in images for s in (caption_sidecar(image), mask_sidecar(image)) if s.is_file()]
    return sorted(images + sidecars)


# --- inspecting one image --------------------------------------------------------------------


def inspect_image(path: Path) -> Row:
    """Decode an image (at 1/8 scale for JPEG) to prove it reads; its size is after EXIF rotation."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
            fmt, mode = image.format, image.mode
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except UnidentifiedImageError:
        return {"problem": "not-an-image", "message": "not an image Pillow can read (wrong extension?): remove or convert it"}
    except Image.DecompressionBombError as exc:
        return {"problem": "too-large", "message": _bomb_message(exc)}
    except (OSError, SyntaxError, ValueError) as exc:
        return {"problem": "corrupt", "message": f"corrupt or truncated image ({exc}): re-export or remove it"}
    if orientation in ROTATING_ORIENTATIONS:
        width, height = height, width
    return {"width": width, "height": height, "orientation": orientation, "format": fmt, "mode": mode}


def _bomb_message(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{megapixels(int(found.group(1)))} megapixels" if found else "too many pixels"
    return (f"{size}, above Pillow's decompression-bomb limit of {megapixels(2 * Image.MAX_IMAGE_PIXELS)} "
            "megapixels: it is not read; downscale it (24 megapixels is plenty) and run again")


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(0x0112, 1) in ROTATING_ORIENTATIONS else (width, height)


# --- the stage -------------------------------------------------------------------------------


def scan_key(concepts: list[Concept], min_side: int, ws: Workspace) -> str:
    """Cache key of the scan: every file's content hash plus the settings the scan reads."""
    index = ws.hashes()
    parts = []
    for c in concepts:
        if c.enabled:
            files = [(ws.relative(p), _digest_or_none(index, p)) for p in concept_files(c, ws)]
            files.append(sorted(ws.relative(p) for p in _entries(c)))  # skipped files change the report
            caption = c.caption.model_dump(mode="json", exclude={"path"})  # the file's content is keyed below
            parts.append((c.name, c.include_subdirectories, caption, files))
    caption_files = [index.current(c.caption.path) for c in concepts if c.caption.path]
    index.save()
    return digest_parts("scan", SCAN_VERSION, min_side, parts, caption_files)


def _entries(concept: Concept) -> list[Path]:
    folder = Path(concept.path)
    return folder_entries(folder, concept.include_subdirectories) if folder.is_dir() else []


def _digest_or_none(index: HashIndex, path: Path) -> str | None:
    try:
        return index.digest(path)
    except OSError:  # unreadable: the scan itself reports it
        return None


def scan_stage(concepts: list[Concept], min_side: int, ws: Workspace, index: HashIndex,
               progress: Progress | None = None, workers: int = 2) -> tuple[StageResult | None, ScanReport]:
    """List, hash and decode every image; write the report, and the table when there is no error.

    Errors do not raise here (the task raises after publishing the report): the result is None."""
    register_readers()
    report = ScanReport()
    candidates = [row for c in concepts if c.enabled for row in _list_concept(c, report, ws)]
    _check_files(candidates, index, report, workers)
    records = ItemRecords(ws.item_records("scan"), index, ws)
    readable = [row for row in candidates if "source_hash" in row]
    with ThreadPoolExecutor(workers) as pool:
        inspected, counts = map_cached(
            readable, key=lambda row: digest_parts(SCAN_VERSION, row["source_hash"]),
            compute=lambda batch: list(pool.map(lambda row: inspect_image(Path(row["source"])), batch)),
            records=records, batch_size=8 * workers, progress=progress)
    rows = []
    for row, info in zip(readable, inspected, strict=True):
        if "problem" in info:
            report.add("error", info["problem"], row["source"], info["message"])
        else:
            rows.append({**row, **info})
    _check_images(rows, concepts, min_side, report)
    _judge_files(concepts, rows, report)
    report.issues.sort(key=lambda i: (i.level, i.kind, i.path))  # threads add them in any order
    write_atomic(ws.report("scan-report.md"), report.markdown())
    index.save()
    if report.errors:  # no table: later stages, even run alone, never read a dataset with errors
        ws.table("scan").unlink(missing_ok=True)
        return None, report
    return write_table(ws, "scan", SCAN_VERSION, rows, counts, extra={"warnings": len(report.warnings)}), report


def _list_concept(concept: Concept, report: ScanReport, ws: Workspace | None = None) -> list[Row]:
    folder = Path(concept.path)
    if "/" in concept.name or concept.name.startswith("."):
        report.add("error", "bad-concept-name", concept.name, "a concept name becomes a folder name: use no '/' and no leading '.'")
        return []
    generated = bool(concept.generate and ws is not None)
    if not folder.exists() and not generated:  # a concept of generated images alone needs no folder
        report.add("error", "missing-folder", folder, f"concept '{concept.name}': folder not found; fix concepts path")
        return []
    if folder.exists() and not folder.is_dir():
        report.add("error", "missing-folder", folder, f"concept '{concept.name}': not a folder; point the concept path at a folder of images")
        return []
    found = [(image, source, prefix) for source, prefix in concept_folders(concept, ws) if source.is_dir()
             for image in list_images(source, concept.include_subdirectories)]
    report.images[concept.name] = len(found)
    if not found:
        hint = "run the generate stage (`likeness prepare`) first" if generated else "add some or disable it"
        report.add("error", "empty-concept", folder, f"concept '{concept.name}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); {hint}")
    seen: dict[str, Path] = {}
    rows = []
    for image, source, prefix in found:
        stem = prefix + image.relative_to(source).with_suffix("").as_posix()
        if stem in seen:
            report.add("error", "name-clash", image, f"shares its name with {seen[stem].name}: outputs would collide; rename one")
            continue
        seen[stem] = image
        rows.append({"id": f"{concept.name}/{stem}", "concept": concept.name, "stem": stem, "source": str(image.absolute())})
    return rows


def _check_files(rows: list[Row], index: HashIndex, report: ScanReport, workers: int) -> None:
    """Hash every non-empty file and its sidecars (in place); zero-byte and unreadable files are errors."""
    def hash_row(row: Row) -> None:
        source = Path(row["source"])
        try:
            if source.stat().st_size == 0:
                report.add("error", "zero-byte", source, "the file is empty: re-copy or remove it")
                return
            row["source_hash"] = index.digest(source)
        except OSError as exc:
            report.add("error", "unreadable", source, f"cannot be read ({exc.strerror}): fix it (permissions, broken link) or remove it")
            return
        for name, path in (("caption_source", caption_sidecar(source)), ("mask_source", mask_sidecar(source))):
            exists = path.is_file()
            row[name] = str(path) if exists else None
            row[f"{name}_hash"] = index.digest(path) if exists else None

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(hash_row, rows))


def _check_images(rows: list[Row], concepts: list[Concept], min_side: int, report: ScanReport) -> None:
    by_name = {c.name: c for c in concepts}
    by_hash: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_hash[row["source_hash"]].append(row["source"])
        if min(row["width"], row["height"]) < min_side:
            report.add("warning", "too-small", row["source"],
                       f"{row['width']}x{row['height']} is below resize.min_side={min_side}: it will be upscaled; use a larger photo")
        _check_mask(row, report)
        _check_caption(row, by_name[row["concept"]], report)
    for paths in by_hash.values():
        for path in paths[1:]:
            report.add("warning", "duplicate", path, f"same content as {paths[0]}: it counts twice; remove one copy")
    for concept in concepts:
        if concept.enabled and concept.caption.source == "text_file" and not Path(concept.caption.path).is_file():
            report.add("error", "missing-caption-file", concept.caption.path, f"concept '{concept.name}': caption file not found; fix caption.path")
        if concept.enabled and concept.caption.source != "per_image":
            _note_unused_captions(concept, [r for r in rows if r["concept"] == concept.name], report)
    _check_pixels(rows, report)
    _check_subject_count(rows, concepts, report)


def _check_pixels(rows: list[Row], report: ScanReport) -> None:
    """Between Pillow's warning threshold and its limit (above it the photo is an error, not a row)."""
    for row in rows:
        pixels = row["width"] * row["height"]
        if pixels > Image.MAX_IMAGE_PIXELS:
            report.add("warning", "very-large", row["source"],
                       f"{megapixels(pixels)} megapixels, above Pillow's decompression-bomb warning threshold of "
                       f"{megapixels(Image.MAX_IMAGE_PIXELS)}: it decodes slowly and needs ~{pixels * 4 / 1e9:.1f} GB "
                       "of memory; downscale it (24 megapixels is plenty)")


def _check_subject_count(rows: list[Row], concepts: list[Concept], report: ScanReport) -> None:
    subjects = [c for c in concepts if c.enabled and c.role == "subject" and not c.validation]
    names = {c.name for c in subjects}
    count = sum(row["concept"] in names for row in rows)
    if subjects and 0 < count < FEW_PHOTOS:
        report.add("warning", "few-photos", subjects[0].path,
                   f"only {count} photo(s) of the subject ({', '.join(sorted(names))}): the guide asks for 10 to 100; "
                   "with fewer the likeness is learned poorly, so add photos if you can")


def _note_unused_captions(concept: Concept, rows: list[Row], report: ScanReport) -> None:
    """Once per concept: `<stem>.txt` files beside its photos that its caption source does not read."""
    unused = [r for r in rows if r["caption_source"]]
    if unused:
        report.add("warning", "unused-captions", concept.path,
                   f"concept '{concept.name}': {len(unused)} caption file(s) (<stem>.txt) are not used because "
                   f"caption.source is '{concept.caption.source}'; set caption.source = 'per_image' to train on them")


def _judge_files(concepts: list[Concept], rows: list[Row], report: ScanReport) -> None:
    """A verdict for every file of every concept folder; photo formats not read become warnings too."""
    worst: dict[str, Issue] = {}
    for issue in sorted(report.issues, key=lambda i: ISSUE_ORDER[i.level], reverse=True):
        worst[os.path.abspath(issue.path)] = issue  # errors last, so they win
    for concept in concepts:
        if not concept.enabled or not Path(concept.path).is_dir():
            continue
        mine = [r for r in rows if r["concept"] == concept.name]
        used = {os.path.abspath(r["source"]): f"{r['width']}x{r['height']} {r['format']}" for r in mine}
        verdicts = file_verdicts(concept, _entries(concept), [Path(r["source"]) for r in mine], worst, used)
        for verdict in verdicts:
            path = Path(concept.path) / verdict.path
            if verdict.verdict == "warning" and os.path.abspath(path) not in worst:
                report.add("warning", "not-read", path, verdict.why)
        report.files += verdicts


def _check_mask(row: Row, report: ScanReport) -> None:
    if not row["mask_source"]:
        return
    try:
        size = oriented_size(Path(row["mask_source"]))
    except (OSError, SyntaxError, ValueError):
        report.add("error", "corrupt-mask", row["mask_source"], "the mask cannot be read: redraw or remove it")
        return
    photo = (row["width"], row["height"])
    if size != photo and not same_aspect(size, photo):
        report.add("error", "mask-size", row["mask_source"],
                   f"mask is {size[0]}x{size[1]} but its photo is {photo[0]}x{photo[1]}, another aspect ratio: "
                   "redraw it at the photo's size (or the same aspect ratio), or remove it")


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Equal aspect ratios within a pixel of rounding (a mask drawn on a downscaled copy of the photo)."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= max(*a, *b)


def _check_caption(row: Row, concept: Concept, report: ScanReport) -> None:
    caption = concept.caption
    if caption.source == "per_image" and caption.on_missing == "error" and not row["caption_source"]:
        report.add("error", "missing-caption", row["source"],
                   f"no {Path(row['source']).stem}.txt beside it: write one, or set concepts caption.on_missing to prefix_only or filename")


def verdict_rows(result: StageResult | None, report: ScanReport, ws: Workspace) -> list[dict[str, str]]:
    """One row per file: concept, file, size and its verdict (ok, or each warning and error on it)."""
    by_path: dict[str, list[Issue]] = defaultdict(list)
    for issue in report.issues:
        by_path[issue.path].append(issue)
    table = []
    for row in (load_rows(result, ws) if result is not None else []):
        found = by_path.pop(row["source"], [])
        table.append({"concept": row["concept"], "file": Path(row["source"]).name,
                      "size": f"{row['width']}x{row['height']}", "verdict": _verdict(found)})
    table += [{"concept": "", "file": Path(path).name or path, "size": "", "verdict": _verdict(issues)}
              for path, issues in by_path.items()]
    return table


def _verdict(issues: list[Issue]) -> str:
    return "; ".join(f"{i.level} {i.kind}: {i.message}" for i in issues) or "ok"


# --- Prefect task ----------------------------------------------------------------------------


@task(name="scan-images", cache_policy=StagePolicy(key_fn=scan_key))
def scan_images(concepts: list[Concept], min_side: int, ws: Workspace, workers: int = 2) -> StageResult:
    """List, hash and decode every photo; errors stop the flow, warnings go to the report."""
    result, report = scan_stage(concepts, min_side, ws, ws.hashes(), progress("scan"), workers)
    create_markdown_artifact(report.markdown(FILES_LIMIT), key="scan-report",
                             description="Dataset problems, found before any heavy work; a verdict for every file")
    create_table_artifact(verdict_rows(result, report, ws), key="scan-files", description="Each photo and its verdict")
    logger = get_run_logger()
    logger.info("scan:\n%s", report.summary())
    for issue in report.warnings[:20]:
        logger.warning("%s: %s: %s", issue.kind, issue.path, issue.message)
    if len(report.warnings) > 20:
        logger.warning("... %d more warnings in %s", len(report.warnings) - 20, ws.report("scan-report.md"))
    report.raise_for_errors()
    logger.info(result.summary())
    return ws.portable(result)
