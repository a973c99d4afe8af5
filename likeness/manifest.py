"""Stage 6, manifest: one validated row per prepared image; what every later stage reads.

`workspace/manifest.csv` (UTF-8 CSV, one header line; empty cell = none), validated by the pandera
schema `ManifestSchema` on write and on read:

| column | meaning |
|---|---|
| id | `<concept>/<stem>`, unique |
| concept, role | the concept's name; `subject` or `regularization` |
| source_path, source_hash | the original photo (never written to) and the sha256 of its bytes |
| (paths) | every `*_path` is stored relative: `{concept:<name>}/...` or `{workspace}/...` (`Workspace.relative`); `read_manifest` gives them absolute |
| prepared_path, prepared_hash | the prepared image (resolution x resolution RGB) and its sha256 |
| mask_path, mask_hash | its `-masklabel.png` (L, same size as the image), or empty |
| caption | the caption of each text variation, separated by a newline (one line usually) |
| caption_path | the `<stem>.txt` beside the prepared image |
| width, height | the training size, SDXL's target size (pad: resolution; bucket: the bucket) |
| bucket | the training size `WxH` (pad: `TxT`); empty in tables written before buckets = width x height |
| original_width, original_height | the photo's size after EXIF rotation (SDXL `original_size`) |
| scaled_width, scaled_height, offset_left, offset_top | pad: where the scaled photo sits on the canvas; bucket: the prepared image's size (scaled to cover the bucket, uncropped) and the centred crop's offset in it |
| balancing, balancing_strategy | resolved (no `auto`) > 0; REPEATS or SAMPLES |
| loss_weight | multiplies the concept's loss (>= 0) |
| validation | a validation concept's image: measured, never trained on |

    df = read_manifest(ws.manifest, ws)    # raises ManifestError naming the failing column
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from PIL import Image
from pandera.errors import SchemaErrors
from pandera.typing.pandas import Series

from likeness.content import HashIndex, bytes_digest, digest_parts
from likeness.files import write_atomic
from likeness.settings import Concept
from likeness.stages import Counts, PrepareError, StageResult, load_rows, rerun_hint, write_table
from likeness.workspace import Workspace

MANIFEST_VERSION = 2  # 2: bucket column
HEX64 = r"^[0-9a-f]{64}$"
OPTIONAL = ("mask_path", "mask_hash", "bucket")
PATHS = ("source_path", "prepared_path", "mask_path", "caption_path")


class ManifestError(PrepareError):
    """The manifest breaks its schema; the message names each failing column."""


class ManifestSchema(pa.DataFrameModel):
    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 3})
    concept: Series[str] = pa.Field(str_length={"min_value": 1})
    role: Series[str] = pa.Field(isin=["subject", "regularization"])
    source_path: Series[str]
    source_hash: Series[str] = pa.Field(str_matches=HEX64)
    prepared_path: Series[str]
    prepared_hash: Series[str] = pa.Field(str_matches=HEX64)
    mask_path: Series[str] = pa.Field(nullable=True)
    mask_hash: Series[str] = pa.Field(nullable=True, str_matches=HEX64)
    caption: Series[str]
    caption_path: Series[str]
    width: Series[int] = pa.Field(gt=0)
    height: Series[int] = pa.Field(gt=0)
    bucket: Series[str] = pa.Field(nullable=True, str_matches=r"^[1-9][0-9]*x[1-9][0-9]*$")
    original_width: Series[int] = pa.Field(gt=0)
    original_height: Series[int] = pa.Field(gt=0)
    scaled_width: Series[int] = pa.Field(gt=0)
    scaled_height: Series[int] = pa.Field(gt=0)
    offset_left: Series[int] = pa.Field(ge=0)
    offset_top: Series[int] = pa.Field(ge=0)
    balancing: Series[float] = pa.Field(gt=0)
    balancing_strategy: Series[str] = pa.Field(isin=["REPEATS", "SAMPLES"])
    loss_weight: Series[float] = pa.Field(ge=0)
    validation: Series[bool]

    class Config:
        name = "manifest"
        strict = True  # no unknown columns
        coerce = True

    @pa.check("prepared_path", "caption_path", name="file_exists")
    def _file_exists(cls, paths: Series[str]) -> Series[bool]:
        return paths.map(lambda p: Path(p).is_file())

    @pa.check("mask_path", name="file_exists")
    def _mask_exists(cls, paths: Series[str]) -> Series[bool]:
        return paths.map(lambda p: Path(p).is_file())

    @pa.check("caption", name="not_empty")
    def _caption_not_empty(cls, captions: Series[str]) -> Series[bool]:
        return captions.map(lambda text: all(line.strip() for line in str(text).split("\n")))

    @pa.dataframe_check(name="mask_size_equals_image_size (mask_path)")
    def _mask_size(cls, df: pd.DataFrame) -> Series[bool]:
        return df.apply(lambda row: _same_size(row["prepared_path"], row["mask_path"]), axis=1)


def bucket_of(row) -> str:
    """A manifest row's training size `WxH` (its own size where the bucket is empty)."""
    return row["bucket"] if isinstance(row["bucket"], str) and row["bucket"] else f"{row['width']}x{row['height']}"


def _same_size(image: str, mask: str | None) -> bool:
    if not isinstance(mask, str) or not mask:
        return True
    try:
        with Image.open(image) as a, Image.open(mask) as b:
            return a.size == b.size
    except OSError:
        return False  # a missing file is reported by file_exists


COLUMNS = list(ManifestSchema.to_schema().columns)


def validate_manifest(df: pd.DataFrame, source: str | Path = "manifest") -> pd.DataFrame:
    """The validated (and coerced) manifest; every failure at once, by column, in one ManifestError."""
    try:
        return ManifestSchema.validate(df, lazy=True)
    except SchemaErrors as exc:
        raise ManifestError(f"{source} is invalid:\n" + _describe(exc.failure_cases)) from None


def _describe(cases: pd.DataFrame) -> str:
    """One line per failing (column, check); table-wide checks name their rows once."""
    lines = []
    for _, case in cases[cases["check"].isin(["column_in_schema", "column_in_dataframe"])].iterrows():
        problem = "unknown column (not in the schema)" if case["check"] == "column_in_schema" else "missing column"
        lines.append(f"  column '{case['failure_case']}': {problem}")
    table = cases[(cases["schema_context"] == "DataFrameSchema") & ~cases["check"].isin(["column_in_schema", "column_in_dataframe"])]
    for check, group in table.groupby("check", sort=False):
        rows = sorted({int(i) for i in group["index"].dropna()})
        lines.append(f"  check '{check}': failed for row(s) {', '.join(map(str, rows[:10]))}")
    columns = cases[cases["schema_context"] != "DataFrameSchema"]
    for (column, check), group in columns.groupby(["column", "check"], sort=False):
        examples = ", ".join(f"row {i}: {v!r}" if pd.notna(i) else repr(v)
                             for i, v in zip(group["index"][:3], group["failure_case"][:3], strict=True))
        lines.append(f"  column '{column}': failed {check} ({len(group)} case(s): {examples})")
    return "\n".join(lines)


def write_manifest(df: pd.DataFrame, path: Path, ws: Workspace | None = None) -> str:
    """Validate and write atomically, paths relative (`ws`: default, the manifest's folder); returns the sha256."""
    df = validate_manifest(df[COLUMNS], path).copy()
    ws = ws or Workspace(Path(path).parent)
    for column in PATHS:
        df[column] = df[column].map(lambda p: ws.relative(p) if isinstance(p, str) and p else p)
    data = df.to_csv(index=False, lineterminator="\n").encode("utf-8")
    write_atomic(path, data)
    return bytes_digest(data)


def read_manifest(path: str | Path, ws: Workspace | None = None) -> pd.DataFrame:
    """The manifest, validated, its paths absolute in `ws` (default: the manifest's folder, no concept
    folders); mask_path / mask_hash are None where there is no mask."""
    path = Path(path)
    ws = ws or Workspace(path.parent)
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; run `{rerun_hint('stage manifest')}` (or `{rerun_hint('prepare')}`)")
    text_columns = {c: str for c in COLUMNS if ManifestSchema.to_schema().columns[c].dtype.type in (str, object)}
    try:
        df = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values={c: [""] for c in OPTIONAL})
    except (ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{path} is not a readable manifest CSV ({exc}); run the manifest stage again") from None
    for column in set(PATHS) & set(df.columns):
        df[column] = df[column].map(lambda p: str(ws.absolute(p)) if isinstance(p, str) and p else p)
    df = validate_manifest(df, path)
    for column in OPTIONAL:
        df[column] = df[column].astype(object).where(df[column].notna(), None)
    return df


# --- the stage -------------------------------------------------------------------------------


def manifest_key(resize: StageResult, masks: StageResult, captions: StageResult, balance: StageResult,
                 concepts: list[Concept], ws: Workspace) -> str:
    keyed = [c.model_dump(mode="json", include={"name", "role", "loss_weight", "validation"}) for c in concepts]
    tables = [r.table_digest for r in (resize, masks, captions, balance)]
    return digest_parts("manifest", MANIFEST_VERSION, tables, keyed)


def build_manifest(resize: StageResult, masks: StageResult, captions: StageResult, balance: StageResult,
                   concepts: list[Concept], ws: Workspace) -> pd.DataFrame:
    mask_rows = {r["id"]: r for r in load_rows(masks, ws)}
    caption_rows = {r["id"]: r for r in load_rows(captions, ws)}
    plans = {r["id"]: r for r in load_rows(balance, ws)}
    by_name = {c.name: c for c in concepts}
    rows = []
    for row in load_rows(resize, ws):
        key, concept = row["id"], by_name[row["concept"]]
        mask, caption, plan = mask_rows[key], caption_rows[key], plans[row["concept"]]
        rows.append({
            "id": key, "concept": concept.name, "role": concept.role, "source_path": row["source"],
            "source_hash": row["source_hash"], "prepared_path": row["prepared"], "prepared_hash": row["prepared_hash"],
            "mask_path": mask["mask"], "mask_hash": mask["mask_hash"], "caption": "\n".join(caption["captions"]),
            "caption_path": caption["caption_file"], "width": row.get("width", row["resolution"]),
            "height": row.get("height", row["resolution"]), "bucket": row.get("bucket"),
            "original_width": row["original_width"], "original_height": row["original_height"],
            "scaled_width": row["scaled_width"], "scaled_height": row["scaled_height"],
            "offset_left": row["offset_left"], "offset_top": row["offset_top"], "balancing": plan["balancing"],
            "balancing_strategy": plan["balancing_strategy"], "loss_weight": concept.loss_weight,
            "validation": concept.validation,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def manifest_stage(resize: StageResult, masks: StageResult, captions: StageResult, balance: StageResult,
                   concepts: list[Concept], ws: Workspace, index: HashIndex) -> StageResult:
    """Join the stage tables, validate, write `manifest.csv`, and drop outputs of removed photos."""
    df = build_manifest(resize, masks, captions, balance, concepts, ws)
    counts = _changed_rows(ws, df)
    digest = write_manifest(df, ws.manifest, ws)
    index.remember(ws.manifest, digest)
    pruned = prune_prepared(ws, df)
    result = write_table(ws, "manifest", MANIFEST_VERSION, [], counts, outputs={str(ws.manifest): digest},
                         extra={"rows": len(df), "pruned": pruned})
    index.save()
    return result


def _changed_rows(ws: Workspace, df: pd.DataFrame) -> Counts:
    """Rows new or different since the manifest last written (processed) and the others (reused)."""
    try:
        old = read_manifest(ws.manifest, ws)
    except (ManifestError, LookupError):  # LookupError: a concept the settings no longer have
        return Counts(processed=len(df))
    key = ["id", "prepared_hash", "mask_hash", "caption", "bucket", "balancing", "loss_weight", "validation"]
    before = set(old[key].astype(str).itertuples(index=False))
    same = sum(row in before for row in df[key].astype(str).itertuples(index=False))
    return Counts(processed=len(df) - same, reused=same)


def prune_prepared(ws: Workspace, df: pd.DataFrame) -> list[str]:
    """Delete prepared files (and user-mask copies) of photos that left the dataset."""
    keep = {str(Path(p)) for column in ("prepared_path", "mask_path", "caption_path") for p in df[column] if isinstance(p, str)}
    keep |= {str(ws.user_mask(*i.split("/", 1))) for i in df["id"]}
    removed = []
    for folder in (ws.prepared, ws.prepare_dir / "user-masks"):
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file() and not path.name.startswith(".") and str(path) not in keep:
                path.unlink()
                removed.append(str(path))
    return removed
