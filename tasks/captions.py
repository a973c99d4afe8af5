"""Stage 4, captions: each prepared image's caption, from its concept's caption source.

Sources (`concept.caption.source`): `text` one fixed caption (`ohwx man`); `text_file` the lines
of a file; `per_image` the lines of `<stem>.txt` beside the original; `filename` the file stem;
`captioner` an image-to-text model through transformers (BLIP by default,
`settings.captioner.model`; or Kosmos-2, see `likeness.tasks.captions_kosmos2` and `captioner.kind`).
One line is picked per text variation, seeded, as OneTrainer picks one per variation. The
concept's `prefix` goes first: `ohwx man, a man with glasses`. With `caption.shuffle_tags` each
variation's tags after the first `keep_tags` are shuffled, seeded.

A missing or empty per-image caption is an error listing every such file, unless the concept's
`on_missing` chooses the prefix alone or the file stem. Written as `<stem>.txt` beside the
prepared image, one line per variation (OneTrainer's layout).

Table rows: id, captions (list, one per variation), caption_file, caption_hash, caption_origin.

    result = captions_stage(resize_result, settings.concepts, settings.captioner, 42, ws, index)
"""

from __future__ import annotations

import random
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from prefect import get_run_logger, task

from likeness.augment import shuffle_tags, variation_rng
from likeness.content import HashIndex, bytes_digest, digest_parts, model_fingerprint
from likeness.files import write_atomic
from likeness.settings import CaptionerSettings, Concept
from likeness.stages import ItemRecords, PrepareError, Progress, Row, StageResult, load_rows, map_cached, write_table
from likeness.tasks.captions_kosmos2 import MAX_NEW_TOKENS as KOSMOS2_MAX_NEW_TOKENS
from likeness.tasks.captions_kosmos2 import is_kosmos2, kosmos2_captions
from likeness.tasks.common import StagePolicy, progress
from likeness.workspace import Workspace

if TYPE_CHECKING:  # torch is imported where tensors are made: a cached run does not pay for it
    import torch

CAPTIONS_VERSION = 1
BLIP_MAX_NEW_TOKENS = 40
# Words BLIP-large is known to invent at the start of captions ("arafed man ...").
CAPTIONER_ARTEFACTS = re.compile(r"\b(araf+ed|araf+e|arafly|arafe)\b\s*", re.IGNORECASE)


class CaptionError(PrepareError):
    """Captions are missing or empty; the message lists the files and what to do."""


def with_prefix(prefix: str, caption: str) -> str:
    """`prefix, caption`, without repeating a prefix the caption already starts with."""
    prefix, caption = " ".join(prefix.split()), " ".join(caption.split())  # one line each
    if not prefix or caption.lower().startswith(prefix.lower()):
        return caption
    return f"{prefix}, {caption}" if caption else prefix


def read_lines(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def clean_generated(text: str) -> str:
    """A generated caption tidied: known artefact words dropped, spaces collapsed, no end period."""
    text = CAPTIONER_ARTEFACTS.sub("", text)
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def pick_variations(candidates: list[str], variations: int, seed: str) -> list[str]:
    """One candidate per variation, the same on every run for the same seed."""
    rng = random.Random(f"likeness-caption:{seed}")
    return [candidates[0] if len(candidates) == 1 else rng.choice(candidates) for _ in range(variations)]


def candidates(row: Row, concept: Concept) -> list[str] | None:
    """Caption lines from a text source; None when a per-image caption is missing or empty."""
    source = concept.caption
    if source.source == "text":
        return [source.text or ""]
    if source.source == "text_file":
        return read_lines(source.path)
    if source.source == "filename":
        return [Path(row["stem"]).name]
    if source.source == "per_image":
        lines = read_lines(row["caption_source"]) if row.get("caption_source") else []
        if lines:
            return lines
        return {"prefix_only": [""], "filename": [Path(row["stem"]).name]}.get(source.on_missing)
    raise ValueError(f"caption source {source.source!r} has no text candidates")


def generate_captions(images: list[Image.Image], model, processor, max_new_tokens: int, device: torch.device) -> list[str]:
    """Image-to-text captions (BLIP and other transformers captioners, Kosmos-2), cleaned."""
    import torch

    if is_kosmos2(model):
        return [clean_generated(text) for text in kosmos2_captions(images, model, processor, max_new_tokens, device)]
    inputs = processor(images=images, return_tensors="pt").to(device)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return [clean_generated(text) for text in processor.batch_decode(ids, skip_special_tokens=True)]


def token_budget(max_new_tokens: int | None, model) -> int:
    """`captioner.max_new_tokens`, or the default of the model's kind: 64 for Kosmos-2, 40 for BLIP and others."""
    if max_new_tokens is not None:
        return max_new_tokens
    return KOSMOS2_MAX_NEW_TOKENS if is_kosmos2(model) else BLIP_MAX_NEW_TOKENS


def load_captioner(name: str, device: str, kind: str = "auto") -> tuple[object, object, torch.device]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from likeness.models.devices import resolve_device

    resolved = resolve_device(device)
    model = AutoModelForImageTextToText.from_pretrained(name).eval().to(resolved)
    if kind != "auto" and (kind == "kosmos2") != is_kosmos2(model):
        raise ValueError(f"captioner.kind is {kind!r} but {name} is a {model.config.model_type} model: "
                         f"set captioner.kind = 'auto' or pick a matching captioner.model")
    return model, AutoProcessor.from_pretrained(name), resolved


# --- the stage -------------------------------------------------------------------------------


def _uses_captioner(concepts: list[Concept]) -> bool:
    return any(c.enabled and c.caption.source == "captioner" for c in concepts)


def _captioner_settings(captioner: CaptionerSettings, concepts: list[Concept], index: HashIndex) -> dict:
    if not _uses_captioner(concepts):
        return {}
    return {"model": model_fingerprint(captioner.model, index), "max_new_tokens": captioner.max_new_tokens,
            "kind": captioner.kind}


def _keyed_caption(concept: Concept) -> dict:
    """The caption settings a key records: all but the text file's path (its content is keyed instead)."""
    return concept.caption.model_dump(mode="json", exclude={"path"})


def captions_key(resize: StageResult, concepts: list[Concept], captioner: CaptionerSettings, seed: int, ws: Workspace) -> str:
    index = ws.hashes()
    sources = [(c.name, _keyed_caption(c), c.text_variations,
                index.current(c.caption.path) if c.caption.source == "text_file" else None) for c in concepts]
    key = digest_parts("captions", CAPTIONS_VERSION, resize.table_digest, sources,
                       _captioner_settings(captioner, concepts, index), seed)
    index.save()
    return key


def captions_stage(resize: StageResult, concepts: list[Concept], captioner: CaptionerSettings, seed: int,
                   ws: Workspace, index: HashIndex, device: str = "auto", progress: Progress | None = None) -> StageResult:
    rows = load_rows(resize, ws)
    by_name = {c.name: c for c in concepts}
    _raise_for_missing(rows, by_name)
    model_settings = _captioner_settings(captioner, concepts, index)
    records = ItemRecords(ws.item_records("captions"), index, ws)

    def key(row: Row) -> str:
        concept = by_name[row["concept"]]
        depends = {"per_image": row.get("caption_source_hash"), "captioner": (row["prepared_hash"], model_settings),
                   "text_file": index.current(concept.caption.path) if concept.caption.path else None}
        return digest_parts(CAPTIONS_VERSION, row["id"], _keyed_caption(concept), concept.text_variations,
                            seed, depends.get(concept.caption.source))

    model = cache(lambda: load_captioner(captioner.model, device, captioner.kind))

    def compute(batch: list[Row]) -> list[Row]:
        generated = _generate(batch, by_name, model, captioner.max_new_tokens)
        return [_write(row, by_name[row["concept"]], text, seed, ws, index) for row, text in zip(batch, generated, strict=True)]

    done, counts = map_cached(rows, key, compute, records, batch_size=captioner.batch_size, progress=progress)
    table = [{"id": row["id"], **out} for row, out in zip(rows, done, strict=True)]
    empty = [row["id"] for row in table if not all(c.strip() for c in row["captions"])]
    if empty:
        raise CaptionError(f"{len(empty)} image(s) would get an empty caption: {', '.join(empty[:20])}; "
                           "set the concept's caption.prefix or write their <stem>.txt")
    result = write_table(ws, "captions", CAPTIONS_VERSION, table, counts)
    index.save()
    return result


def _raise_for_missing(rows: list[Row], by_name: dict[str, Concept]) -> None:
    missing = [row["source"] for row in rows if by_name[row["concept"]].caption.source == "per_image"
               and by_name[row["concept"]].caption.on_missing == "error" and candidates(row, by_name[row["concept"]]) is None]
    if missing:
        listing = "\n".join(f"  {Path(p).with_suffix('.txt')}" for p in missing)
        raise CaptionError(f"{len(missing)} image(s) have no caption file (or an empty one); write them, or set the "
                           f"concept's caption.on_missing to prefix_only or filename:\n{listing}")


def _generate(batch: list[Row], by_name: dict[str, Concept], model, max_new_tokens: int | None) -> list[str | None]:
    wanted = [i for i, row in enumerate(batch) if by_name[row["concept"]].caption.source == "captioner"]
    out: list[str | None] = [None] * len(batch)
    if wanted:
        captioner, processor, device = model()
        images = [Image.open(batch[i]["prepared"]).convert("RGB") for i in wanted]
        budget = token_budget(max_new_tokens, captioner)
        for i, text in zip(wanted, generate_captions(images, captioner, processor, budget, device), strict=True):
            out[i] = text
    return out


def _write(row: Row, concept: Concept, generated: str | None, seed: int, ws: Workspace, index: HashIndex) -> Row:
    lines = [generated] if generated is not None else candidates(row, concept) or [""]
    captions = [with_prefix(concept.caption.prefix, c)
                for c in pick_variations(lines, concept.text_variations, f"{seed}:{row['id']}")]
    if concept.caption.shuffle_tags:  # once per text variation, seeded: cacheable, see likeness/augment.py
        captions = [shuffle_tags(c, concept.caption.tag_delimiter, concept.caption.keep_tags,
                                 variation_rng(seed, row["id"], v, "tags")) for v, c in enumerate(captions)]
    target = ws.prepared_caption(row["concept"], row["stem"])
    data = ("\n".join(captions) + "\n").encode("utf-8")
    write_atomic(target, data)
    index.remember(target, bytes_digest(data))
    return {"captions": captions, "caption_file": str(target), "caption_hash": bytes_digest(data),
            "caption_origin": concept.caption.source, "outputs": {str(target): bytes_digest(data)}}


# --- Prefect task ----------------------------------------------------------------------------


@task(name="write-captions", cache_policy=StagePolicy(key_fn=captions_key))
def write_captions(resize: StageResult, concepts: list[Concept], captioner: CaptionerSettings, seed: int,
                   ws: Workspace, device: str = "auto") -> StageResult:
    """`<stem>.txt` beside each prepared image, from the concept's caption source."""
    result = captions_stage(resize, concepts, captioner, seed, ws, ws.hashes(), device, progress("captions"))
    get_run_logger().info(result.summary())
    return ws.portable(result)
