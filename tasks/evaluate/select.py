"""Evaluation, stage "select": pick one checkpoint from the score table, say why, and copy it out.

Rules (`evaluation.selection.rule`):
- likeness (default): the highest face identity among the checkpoints that pass the guards; the
  checkpoints within `identity_margin` of that best identity are ranked by likeness (the mean of
  the enabled DINO and CLIP-I, the secondary metrics). Without a face identity (not measured, or
  no face in any image) likeness alone ranks, with a warning. Guards:
  prompt fidelity   clip_t >= base clip_t - fidelity_tolerance        (absolute)
  class prior       class_prior_loss <= base loss x (1 + class_prior_tolerance)  (relative)
  faces             face_no_face <= max_no_face, while some checkpoint meets it: a checkpoint
                    whose images mostly show no face never wins, not even when no checkpoint
                    passes the other guards
  A guard whose metric was not measured (or not for the base model) passes everything.
- validation_loss: the lowest validation loss among the checkpoints that pass the guards;
- weighted: the highest sum of weight x metric (losses subtracted) among those that pass;
- epoch: the checkpoint saved at `selection.epoch`, guards ignored.
Ties go to the earlier checkpoint. When no checkpoint passes the guards, the rule picks among all
of them and the report says so in a warning: the model may be overtrained or the tolerances tight.

Outputs: the chosen checkpoint copied atomically to `settings.output_destination` (a folder, or a
`.safetensors` path), `evaluation/selection.md` (score table, the reason in one sentence) and
`evaluation/selection.png` (likeness vs prompt fidelity per checkpoint).
A new pick replaces the earlier ones: the copies an earlier `select` made at the destination (named
in `.likeness-picks.json` there, with their content hash) are removed while unchanged, so the
destination holds the chosen checkpoint alone; a user's file there is never touched.

    choice = choose(rows, settings.evaluation.selection)
    print(choice.reason)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from likeness.content import HashIndex, digest_parts, file_digest, folder_digest
from likeness.files import atomic_path, write_atomic
from likeness.settings import SelectionSettings
from likeness.stages import Counts, StageResult, rerun_hint
from likeness.tasks.common import StagePolicy
from likeness.tasks.evaluate.grid import EvaluationError, eval_table, evaluation_dir, read_eval_table, write_eval_table
from likeness.workspace import Workspace

METRICS = ("face_identity", "dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss")
LIKENESS_METRICS = ("dino", "clip_i")
LOSS_METRICS = ("class_prior_loss", "validation_loss")
SELECT_VERSION = 2  # 2: face identity first
EPS = 1e-9  # a value exactly at a tolerance passes, whatever the float rounding

Row = dict[str, Any]


class SelectionError(EvaluationError):
    """The scores cannot support the chosen rule (a metric not measured, no such epoch, ...)."""


def likeness(values: Row, enabled: Sequence[str] = METRICS) -> float | None:
    """The mean of the enabled likeness metrics that were measured; None when there are none."""
    found = [values[m] for m in LIKENESS_METRICS if m in enabled and values.get(m) is not None]
    return sum(found) / len(found) if found else None


@dataclass
class Choice:
    row: Row
    rule: str
    reason: str
    failures: dict[str, list[str]] = field(default_factory=dict)  # checkpoint -> guards it fails
    warnings: list[str] = field(default_factory=list)


def face_failure(row: Row, selection: SelectionSettings) -> str | None:
    """Why `row` fails the face guard (most of its images show no face), or None."""
    share = row.get("face_no_face")
    if share is not None and share > selection.max_no_face + EPS:
        return f"no face in {share:.0%} of its images (> {selection.max_no_face:.0%})"
    return None


def guard_failures(row: Row, base: Row | None, selection: SelectionSettings) -> list[str]:
    """Why `row` fails the prompt-fidelity and class-prior guards against the base model (empty: it passes)."""
    if base is None:
        return []
    failures = []
    fidelity, base_fidelity = row.get("clip_t"), base.get("clip_t")
    if fidelity is not None and base_fidelity is not None:
        floor = base_fidelity - selection.fidelity_tolerance
        if fidelity < floor - EPS:
            failures.append(f"prompt fidelity {fidelity:.4f} < {floor:.4f} (base {base_fidelity:.4f} - "
                            f"{selection.fidelity_tolerance:g})")
    loss, base_loss = row.get("class_prior_loss"), base.get("class_prior_loss")
    if loss is not None and base_loss is not None:
        ceiling = base_loss * (1 + selection.class_prior_tolerance)
        if loss > ceiling + EPS:
            failures.append(f"class-prior loss {loss:.4f} > {ceiling:.4f} (base {base_loss:.4f} + "
                            f"{selection.class_prior_tolerance:.0%})")
    return failures


def rule_score(row: Row, selection: SelectionSettings) -> float:
    """Higher is better; raises SelectionError when a metric the rule needs was not measured."""
    if selection.rule == "likeness":
        return _needed(row, "likeness", selection, "enable face_identity, dino or clip_i in evaluation.metrics, or "
                       "pick another rule")
    if selection.rule == "validation_loss":
        return -_needed(row, "validation_loss", selection, "add a concept with validation = true and keep "
                        "validation_loss in evaluation.metrics, or pick another rule")
    total = 0.0
    for metric, weight in selection.weights.items():
        if weight:
            value = _needed(row, metric, selection, f"add {metric} to evaluation.metrics or set its weight to 0")
            total += -weight * value if metric in LOSS_METRICS else weight * value
    return total


def _needed(row: Row, metric: str, selection: SelectionSettings, hint: str) -> float:
    value = row.get(metric)
    if value is None:
        raise SelectionError(f"evaluation.selection.rule = {selection.rule!r} needs {metric}, which was not measured "
                             f"for {row['checkpoint']}: {hint}")
    return float(value)


def choose(rows: Sequence[Row], selection: SelectionSettings) -> Choice:
    """Apply the rule to score rows (the base model's row has base = true); ties -> the earlier checkpoint."""
    base = next((r for r in rows if r.get("base")), None)
    checkpoints = sorted((r for r in rows if not r.get("base")), key=lambda r: (r["epoch"], r.get("step", 0)))
    if not checkpoints:
        raise SelectionError("the score table has no checkpoint (only the base model): run `likeness evaluate` "
                             "with the checkpoints of a training run")
    if selection.rule == "epoch":
        return _by_epoch(checkpoints, selection.epoch)
    failures = {r["checkpoint"]: guard_failures(r, base, selection) for r in checkpoints}
    warnings = []
    faces = {r["checkpoint"]: face_failure(r, selection) for r in checkpoints}
    with_faces = [r for r in checkpoints if faces[r["checkpoint"]] is None]
    if with_faces:  # the face guard counts only when some checkpoint shows faces
        for row in checkpoints:
            if faces[row["checkpoint"]]:
                failures[row["checkpoint"]].append(faces[row["checkpoint"]])
    elif any(r.get("face_no_face") is not None for r in checkpoints):
        warnings.append(f"no checkpoint shows a face in at least {1 - selection.max_no_face:.0%} of its images: "
                        "face identity cannot decide, DINO / CLIP-I rank alone; check the grid")
    passed = [r for r in checkpoints if not failures[r["checkpoint"]]]
    best = _best(passed or with_faces or checkpoints, selection)
    if selection.rule == "likeness" and best.get("face_identity") is None and "face_identity" in best:
        warnings.append(f"{_label(best)} was ranked by DINO / CLIP-I alone: no face identity was measured")
    warnings += [] if passed else [
        f"no checkpoint passed the guards (prompt fidelity within {selection.fidelity_tolerance:g} of the base model, "
        f"class-prior loss within {selection.class_prior_tolerance:.0%} of it): {_label(best)} is the best by "
        f"rule {selection.rule!r} among all checkpoints; check the grid, the model may be overtrained"]
    return Choice(best, selection.rule, _reason(best, selection, len(passed), len(checkpoints)), failures, warnings)


def _best(pool: Sequence[Row], selection: SelectionSettings) -> Row:
    if selection.rule == "likeness":
        return _best_likeness(pool, selection)
    best, best_score = pool[0], rule_score(pool[0], selection)
    for row in pool[1:]:
        score = rule_score(row, selection)
        if score > best_score:  # strictly better: a tie keeps the earlier checkpoint
            best, best_score = row, score
    return best


def _best_likeness(pool: Sequence[Row], selection: SelectionSettings) -> Row:
    """Face identity first; within identity_margin of the best, likeness (DINO / CLIP-I) decides."""
    identified = [r for r in pool if r.get("face_identity") is not None]
    if not identified:
        return max(pool, key=lambda r: rule_score(r, selection))  # max keeps the first (earliest) of ties
    top = max(r["face_identity"] for r in identified)
    close = [r for r in identified if r["face_identity"] >= top - selection.identity_margin - EPS]
    if selection.identity_margin == 0 or any(r.get("likeness") is None for r in close):
        return max(close, key=lambda r: r["face_identity"])
    return max(close, key=lambda r: r["likeness"])


def _by_epoch(checkpoints: Sequence[Row], epoch: int | None) -> Choice:
    matches = [r for r in checkpoints if r["epoch"] == epoch]
    if not matches:
        raise SelectionError(f"evaluation.selection.epoch = {epoch}: no checkpoint of that epoch was evaluated "
                             f"(epochs: {', '.join(str(r['epoch']) for r in checkpoints)})")
    return Choice(matches[0], "epoch", f"{_label(matches[0])} was chosen because evaluation.selection.epoch = {epoch}.")


def _label(row: Row) -> str:
    return f"{row['checkpoint']} (epoch {row['epoch']})"


def _likeness_reason(row: Row, selection: SelectionSettings) -> str:
    if row.get("face_identity") is None:
        return f"the highest likeness ({row.get('likeness') or 0:.4f}, DINO / CLIP-I; no face identity)"
    if selection.identity_margin and row.get("likeness") is not None:
        return (f"the highest DINO / CLIP-I likeness ({row['likeness']:.4f}) among those within "
                f"{selection.identity_margin:g} of the best face identity (its own: {row['face_identity']:.4f})")
    return f"the highest face identity ({row['face_identity']:.4f})"


def _reason(row: Row, selection: SelectionSettings, passed: int, total: int) -> str:
    what = {"likeness": _likeness_reason(row, selection),
            "validation_loss": f"the lowest validation loss ({row.get('validation_loss') or 0:.4f})",
            "weighted": f"the highest weighted score ({rule_score(row, selection):.4f})"}[selection.rule]
    if passed == 0:
        return (f"{_label(row)} has {what} of all {total} checkpoints, none of which kept prompt fidelity and "
                "class-prior loss within the tolerances (or showed faces in most images).")
    return (f"{_label(row)} has {what} of the {passed} of {total} checkpoints whose prompt fidelity stays within "
            f"{selection.fidelity_tolerance:g} of the base model's and whose class-prior loss stays within "
            f"{selection.class_prior_tolerance:.0%} of it.")


# --- outputs ---------------------------------------------------------------------------------


def destination_path(source: Path, destination: Path) -> Path:
    """`destination` itself when it names a .safetensors file (and the source is one), else destination/<name>."""
    if destination.suffix == ".safetensors" and source.is_file():
        return destination
    return destination / source.name


def copy_checkpoint(source: Path, target: Path) -> Path:
    """Copy a checkpoint file (or diffusers folder) atomically; the original stays where it is."""
    if source.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            shutil.copytree(source, tmp / "copy")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "copy", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    with atomic_path(target) as tmp_file:
        shutil.copyfile(source, tmp_file)
    return target


PICKS_FILE = ".likeness-picks.json"  # beside the copies: what `select` put there, by content


def _digest(path: Path, index: HashIndex) -> str:
    return folder_digest(path, index) if path.is_dir() else index.digest(path)


def replace_earlier_picks(copied: Path, index: HashIndex) -> list[Path]:
    """Remove the copies earlier `select` runs left beside `copied`, and record `copied` instead.

    Only what the record (PICKS_FILE in that folder) names AND that still has the content `select`
    wrote is removed: a file the user put there, or changed since, is never touched. Returns the
    removed paths.
    """
    record = copied.parent / PICKS_FILE
    try:
        picks = json.loads(record.read_text(encoding="utf-8")).get("picks", {})
    except (OSError, ValueError, AttributeError):
        picks = {}
    removed = []
    for name, digest in picks.items():
        earlier = copied.parent / Path(name).name
        if earlier == copied or not earlier.exists() or _digest(earlier, index) != digest:
            continue
        shutil.rmtree(earlier) if earlier.is_dir() else earlier.unlink()
        removed.append(earlier)
    write_atomic(record, json.dumps({"picks": {copied.name: _digest(copied, index)}}, indent=1))
    return removed


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def score_table(rows: Sequence[Row], choice: Choice) -> list[Row]:
    """The rows as the report and the Prefect table artifact show them."""
    shown = []
    for row in rows:
        verdict = "base model" if row.get("base") else "; ".join(choice.failures.get(row["checkpoint"], [])) or "passes"
        if row["checkpoint"] == choice.row["checkpoint"]:
            verdict = "**chosen** " + verdict
        spread = ("-" if row.get("face_identity_min") is None else
                  f"{row['face_identity_min']:.3f}..{row['face_identity_max']:.3f} (sd {row['face_identity_std']:.3f})")
        shown.append({"checkpoint": row["checkpoint"], "epoch": "-" if row.get("base") else row["epoch"],
                      "face_identity": _cell(row.get("face_identity")), "no_face": _share(row.get("face_no_face")),
                      "identity_spread": spread, **{m: _cell(row.get(m)) for m in ("likeness", *METRICS[1:])},
                      "guards": verdict})
    return shown


def report_markdown(rows: Sequence[Row], choice: Choice, copied: Path | str, plot: Path | None, grids: Sequence[str]) -> str:
    table = score_table(rows, choice)
    header = list(table[0])
    lines = ["# Checkpoint selection", "", f"**Chosen:** `{choice.row['checkpoint']}` -> `{copied}`", "",
             choice.reason, ""]
    lines += [f"> **Warning:** {w}\n" for w in choice.warnings]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in table]
    lines += ["", f"Rule: `{choice.rule}`. face_identity is the mean cosine similarity of the generated faces with "
              "the training photos' faces (YuNet + SFace; about 0.3 and above: the same person), over the images "
              "with a face; no_face is the share of images where no face was found. Likeness is the mean of dino "
              "and clip_i (DreamBooth's DINO and CLIP-I, on head crops); clip_t is prompt fidelity (CLIP-T); losses are deterministic diffusion losses on "
              "images never trained on (lower is better)."]
    if plot is not None:
        lines += ["", f"![likeness vs prompt fidelity]({plot.name})"]
    if grids:
        lines += ["", "Grids: " + ", ".join(f"`{g}`" for g in grids)]
    return "\n".join(lines) + "\n"


def plot_scores(rows: Sequence[Row], choice: Choice, selection: SelectionSettings, path: Path) -> Path:
    """Face identity (y; likeness where no face was found anywhere) vs prompt fidelity (x) per checkpoint,
    the identity's min..max as a bar, the base model and the fidelity floor marked."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display (Agg canvas)

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.subplots()
    y = "face_identity" if any(r.get("face_identity") is not None for r in rows) else "likeness"
    points = [r for r in rows if r.get("clip_t") is not None and r.get(y) is not None]
    for row in points:
        chosen = row["checkpoint"] == choice.row["checkpoint"]
        style = dict(marker="s", color="grey") if row.get("base") else dict(marker="*" if chosen else "o",
                                                                              color="crimson" if chosen else "tab:blue")
        if y == "face_identity":
            spread = [[row[y] - row["face_identity_min"]], [row["face_identity_max"] - row[y]]]
            axes.errorbar(row["clip_t"], row[y], yerr=spread, color=style["color"], alpha=0.4, linewidth=1)
        axes.scatter(row["clip_t"], row[y], s=120 if chosen else 40, **style)
        axes.annotate("base" if row.get("base") else str(row["epoch"]), (row["clip_t"], row[y]),
                      textcoords="offset points", xytext=(5, 5), fontsize=8)
    base = next((r for r in rows if r.get("base") and r.get("clip_t") is not None), None)
    if base is not None:
        axes.axvline(base["clip_t"] - selection.fidelity_tolerance, linestyle="--", color="grey", linewidth=1,
                     label="prompt-fidelity floor")
        axes.legend(loc="best", fontsize=8)
    if not points:
        axes.text(0.5, 0.5, "face identity / likeness or prompt fidelity not measured", ha="center", transform=axes.transAxes)
    axes.locator_params(nbins=5)
    axes.set_xlabel("prompt fidelity (CLIP-T)")
    axes.set_ylabel("face identity (SFace cosine, min..max)" if y == "face_identity" else "likeness (mean of DINO, CLIP-I)")
    axes.set_title("Checkpoints by epoch")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


# --- the stage -------------------------------------------------------------------------------


def select_key(scores: StageResult, selection: SelectionSettings, destination: Path, ws: Workspace) -> str:
    return digest_parts("select", SELECT_VERSION, scores.table_digest, selection.model_dump(mode="json"),
                        ws.relative(destination))


def scores_table(ws: Workspace) -> StageResult:
    """The scores `likeness evaluate` wrote; a clear error naming that command when there are none."""
    path = eval_table(ws, "scores")
    if not path.is_file():
        raise EvaluationError(f"no evaluation scores in {path}: run `{rerun_hint('evaluate')}` first "
                              "(it generates the grids and scores every checkpoint)")
    return StageResult("scores", path, file_digest(path), 0, 0)


def select_stage(scores: StageResult, selection: SelectionSettings, destination: Path, ws: Workspace,
                 index: HashIndex) -> StageResult:
    """Choose, copy the checkpoint out, write selection.md and selection.png; the table is evaluation/select.json."""
    rows = read_eval_table(scores, ws)["rows"]
    choice = choose(rows, selection)
    source = Path(choice.row["path"])
    copied = copy_checkpoint(source, destination_path(source, Path(destination)))
    removed = replace_earlier_picks(copied, index)
    folder = evaluation_dir(ws)
    plot = plot_scores(rows, choice, selection, folder / "selection.png")
    grid = eval_table(ws, "grid")
    grids = read_eval_table(StageResult("grid", grid, "", 0, 0), ws)["extra"]["grids"] if grid.is_file() else []
    # The report names paths as records do (`{workspace}/output/...`): it is kept in the table, valid after a move.
    report = report_markdown(rows, choice, ws.relative(copied), plot, [ws.relative(g) for g in grids])
    report_path = write_atomic(folder / "selection.md", report)
    outputs = {str(p): index.digest(p) for p in (report_path, plot)}
    if copied.is_file():
        outputs[str(copied)] = index.digest(copied)
    extra = {"chosen": choice.row["checkpoint"], "source": str(source), "copied": str(copied), "reason": choice.reason,
             "warnings": choice.warnings, "report": str(report_path), "plot": str(plot), "markdown": report,
             "table": score_table(rows, choice), "removed": [str(p) for p in removed]}
    result = write_eval_table(ws, "select", [choice.row], Counts(processed=1), outputs, extra)
    index.save()
    return result


def as_text(table: list[Row]) -> list[Row]:
    """Table cells the UI renders as text: it reads cells as markdown, where a lone "-" is a bullet."""
    def cell(value: Any) -> Any:
        return "\\" + value if isinstance(value, str) and value.strip() in ("-", "*", "+") else value
    return [{key: cell(value) for key, value in row.items()} for row in table]


# --- Prefect task ----------------------------------------------------------------------------


@task(name="select-checkpoint", cache_policy=StagePolicy(key_fn=select_key))
def select_checkpoint(scores: StageResult, selection: SelectionSettings, destination: Path, ws: Workspace) -> StageResult:
    """The best checkpoint by the selection rule, copied to the output destination, with its report."""
    result = select_stage(scores, selection, destination, ws, ws.hashes())
    extra = read_eval_table(result, ws)["extra"]
    plot = Path(extra["plot"])
    inline = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
    create_markdown_artifact(extra["markdown"].replace(f"]({plot.name})", f"]({inline})"), key="selection",
                             description=extra["reason"])
    create_table_artifact(as_text(extra["table"]), key="selection-table", description="Scores and guards per checkpoint")
    logger = get_run_logger()
    for warning in extra["warnings"]:
        logger.warning(warning)
    logger.info("%s -> %s: %s", extra["chosen"], extra["copied"], extra["reason"])
    for earlier in extra.get("removed", []):
        logger.info("removed %s, the checkpoint an earlier selection copied there", earlier)
    return ws.portable(result)
