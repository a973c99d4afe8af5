"""The extract-lora stage (after select, on with `lora.extract = true`): the chosen checkpoint minus
the base model as ONE LoRA file in the kohya/A1111/ComfyUI layout, for use on stylized models that
a full fine-tune does not carry over to.

Reads the select stage's table (the chosen checkpoint), writes `<output>/<checkpoint name>-lora.safetensors`
and `evaluation/extract-lora.json` (relative error per part, file size). A run trained with
`training.method = "lora"` already chose a LoRA: the stage reports it and extracts nothing.
Cached by the chosen checkpoint's content, the base model's and `settings.lora`.

    likeness extract-lora CHECKPOINT --base BASE -o person-lora.safetensors --rank 32   # alone, no Prefect
    result = extract_lora_stage(selected, settings, ws, ws.hashes())       # the stage, plain
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from likeness.content import HashIndex, digest_parts, file_digest, model_fingerprint
from likeness.settings import Settings
from likeness.stages import Counts, StageResult
from likeness.tasks.common import StagePolicy
from likeness.tasks.evaluate.grid import EvaluationError, eval_table, read_eval_table, write_eval_table
from likeness.workspace import Workspace

if TYPE_CHECKING:
    from likeness.models.lora_extract import ExtractionReport

EXTRACT_VERSION = 1


def selected_table(ws: Workspace) -> StageResult:
    """The select stage's result, read from disk; a clear error naming the command when there is none."""
    path = eval_table(ws, "select")
    if not path.is_file():
        raise EvaluationError(f"no selection in {path}: run `likeness select --profile <profile>` first")
    return StageResult("select", path, file_digest(path), 0, 0)


def lora_path(source: Path, destination: Path) -> Path:
    """Where the LoRA of checkpoint `source` goes: beside the chosen copy, `<name>-lora.safetensors`."""
    folder = destination.parent if destination.suffix == ".safetensors" else destination
    return folder / f"{source.name.removesuffix('.safetensors')}-lora.safetensors"


def extract_lora_key(selected: StageResult, settings: Settings, ws: Workspace) -> str:
    index = ws.hashes()
    return digest_parts("extract-lora", EXTRACT_VERSION, selected.table_digest, settings.lora.model_dump(mode="json"),
                        model_fingerprint(settings.model.base_model, index), ws.relative(settings.output_destination))


def extract_lora_stage(selected: StageResult, settings: Settings, ws: Workspace, index: HashIndex,
                       log: Callable[[str], None] = print) -> StageResult:
    """Extract the chosen checkpoint's LoRA (see the module docstring); the table is evaluation/extract-lora.json."""
    from likeness.models.lora import is_lora_file  # torch, safetensors: not on a cached run
    from likeness.models.lora_extract import extract_lora

    chosen = read_eval_table(selected, ws)["extra"]
    source = Path(chosen["source"])
    if is_lora_file(source):
        log(f"extract-lora: {source.name} is a LoRA already (training.method = 'lora'): {chosen['copied']}")
        extra = {"lora": chosen["copied"], "source": str(source), "extracted": False}
        return write_eval_table(ws, "extract-lora", [], Counts(reused=1), {}, extra)
    out = lora_path(source, settings.output_destination)
    report = extract_lora(source, settings.model.base_model, out, rank=settings.lora.rank, dtype=settings.lora.dtype,
                          log=log)
    extra = {"lora": str(out), "source": str(source), "extracted": True, "rank": report.rank, "bytes": report.bytes,
             "seconds": round(report.seconds, 2), "markdown": report_markdown(report),
             "relative_error": {part: r.relative_error for part, r in report.parts.items() if r.layers > r.unchanged}}
    result = write_eval_table(ws, "extract-lora", [], Counts(processed=1), {str(out): index.digest(out)}, extra)
    index.save()
    return result


def report_markdown(report: ExtractionReport) -> str:
    from likeness.models.lora_extract import PARTS

    lines = [f"# LoRA extracted: `{report.path.name}`", "",
             f"rank {report.rank}, {report.bytes / 2**20:.1f} MiB, {report.seconds:.1f} s", "",
             "| part | layers | unchanged (left out) | relative error |", "|---|---|---|---|"]
    for part, r in report.parts.items():
        lines.append(f"| {PARTS[part]} | {r.layers} | {r.unchanged} | {r.relative_error:.4f} |")
    return "\n".join(lines) + "\n"


@task(name="extract-lora", cache_policy=StagePolicy(key_fn=extract_lora_key))
def extract_lora_task(selected: StageResult, settings: Settings, ws: Workspace) -> StageResult:
    """The chosen checkpoint as a LoRA file, with the reconstruction error per part as an artifact."""
    logger = get_run_logger()
    result = extract_lora_stage(selected, settings, ws, ws.hashes(), log=logger.info)
    extra = read_eval_table(result, ws)["extra"]
    if extra.get("markdown"):
        create_markdown_artifact(extra["markdown"], key="extract-lora", description=f"LoRA {extra['lora']}")
    return ws.portable(result)
