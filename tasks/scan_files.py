"""A verdict for every file in a concept folder: used, skipped (and why), warning or error.

The scan (tasks/scan.py) reads the photos; this module says what became of everything else it
saw, so the report accounts for each file a user put in the folder:

    used      a photo, a mask drawn for a photo (`<stem>-masklabel.png`), a caption read
              (`<stem>.txt` with caption.source = per_image)
    skipped   hidden and system files (.DS_Store, Thumbs.db, desktop.ini, ._* AppleDouble files),
              OneTrainer's `-condlabel` files, masks and captions without a photo of that name,
              captions the concept does not read, other file types, subfolders (unless
              include_subdirectories) and hidden folders
    warning   a photo with a warning (too small, duplicate, very large), and photos in a format
              likeness does not read (GIF, camera RAW, PSD, SVG): skipped, but they look like
              photos the user meant to train on, so the log says so
    error     whatever the scan found wrong with the file (the run stops)

    entries = folder_entries(folder, recursive=False)        # every file and folder in scope
    verdicts = file_verdicts(concept, entries, images, issues_by_path)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from likeness.settings import Concept

IMAGE_EXTENSIONS = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif"})
LABEL_SUFFIXES = ("-masklabel", "-condlabel")
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r", ".directory"})
# Photo formats a user may expect to be read: skipped with a warning that says how to convert them.
UNREAD_PHOTOS = {
    ".gif": "GIF (256 colours, maybe animated) is not read: convert it to PNG or JPEG to train on it",
    ".psd": "Photoshop files are not read: export it as PNG or JPEG to train on it",
    ".svg": "vector images are not read: export it as PNG to train on it",
    **{ext: "camera RAW is not read: export it as JPEG or PNG (or TIFF) to train on it"
       for ext in (".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw")},
}
Level = Literal["used", "skipped", "warning", "error"]


class IssueLike(Protocol):
    level: str
    message: str


@dataclass(frozen=True)
class Verdict:
    concept: str
    path: str  # relative to the concept folder; folders end with '/'
    verdict: Level
    why: str


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def is_image_file(path: Path) -> bool:
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.stem.endswith(LABEL_SUFFIXES)
            and not is_hidden(path.name))


def folder_entries(folder: Path, recursive: bool = False) -> list[Path]:
    """Every file and folder the scan looks at, sorted: the top level, or with `recursive` the whole
    tree except inside hidden folders (which are listed themselves, not entered)."""
    if not recursive:
        return sorted(folder.iterdir())
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        found += [here / d for d in dirs] + [here / f for f in files]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def file_verdicts(concept: Concept, entries: Iterable[Path], images: Iterable[Path],
                  issues: Mapping[str, IssueLike], used_info: Mapping[str, str]) -> list[Verdict]:
    """One verdict per entry. `images`: the photos the scan read; `issues`: the worst issue by absolute
    path; `used_info`: a short description of each photo read ("1024x768 JPEG"), by absolute path."""
    folder = Path(concept.path)
    photos = {p.with_suffix("").absolute(): p for p in images}
    out = []
    for entry in entries:
        key = os.path.abspath(entry)
        name = entry.relative_to(folder).as_posix() + ("/" if entry.is_dir() and not entry.is_symlink() else "")
        if key in issues:
            issue = issues[key]
            out.append(Verdict(concept.name, name, "error" if issue.level == "error" else "warning", issue.message))
        else:
            verdict, why = _classify(entry, concept, photos, used_info.get(key))
            out.append(Verdict(concept.name, name, verdict, why))
    return out


def _classify(entry: Path, concept: Concept, photos: Mapping[Path, Path], info: str | None) -> tuple[Level, str]:
    if entry.is_dir() and not entry.is_symlink():
        if entry.name.startswith("."):
            return "skipped", "hidden folder: not read"
        if not concept.include_subdirectories:
            return "skipped", "a subfolder: not read (set include_subdirectories = true to read subfolders)"
        return "used", "subfolder, read"
    if is_hidden(entry.name):
        return "skipped", ("AppleDouble metadata file (macOS)" if entry.name.startswith("._")
                           else "hidden or system file")
    if info is not None:
        return "used", f"photo, {info}"
    suffix, stem = entry.suffix.lower(), entry.with_suffix("").absolute()
    if stem.name.endswith("-masklabel"):
        return _mask_verdict(entry, photos)
    if stem.name.endswith("-condlabel"):
        return "skipped", "a OneTrainer conditioning label: likeness does not use it"
    if suffix == ".txt" and stem in photos:
        if concept.caption.source == "per_image":
            return "used", f"caption of {photos[stem].name}"
        return "skipped", f"caption of {photos[stem].name}, unused: caption.source is '{concept.caption.source}'"
    if suffix == ".txt":
        return "skipped", "a text file without a photo of that name"
    if suffix in UNREAD_PHOTOS:
        return "warning", f"skipped: {UNREAD_PHOTOS[suffix]}"
    return "skipped", (f"not an image type likeness reads ({suffix or 'no extension'}); it reads "
                       f"{', '.join(sorted(IMAGE_EXTENSIONS))}")


def _mask_verdict(entry: Path, photos: Mapping[Path, Path]) -> tuple[Level, str]:
    photo = photos.get(entry.with_name(entry.stem.removesuffix("-masklabel")).absolute())
    if photo is None:
        return "skipped", "a mask without a photo of that name"
    if entry.suffix.lower() != ".png":
        return "skipped", f"masks are read as {photo.stem}-masklabel.png only"
    return "used", f"your mask of {photo.name}"
