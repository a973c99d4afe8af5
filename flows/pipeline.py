"""The whole pipeline: photos -> prepared dataset -> checkpoints -> grid and scores -> the chosen one.

prepare -> train -> evaluate -> select (-> extract-lora with `lora.extract = true`), each the flow of its own stage (so each shows as a subflow
in the Prefect UI and runs alone too), each cached by content: a second run with nothing changed
finishes with everything `Cached`; a run after adding one evaluation prompt only generates that
prompt's images; a changed photo redoes that photo, then training and what follows.

    likeness run --profile demo-cpu
    python -m likeness.flows.pipeline PROFILE [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from likeness.flows.evaluate import evaluate, select
from likeness.flows.lora import extract_lora
from likeness.flows.prepare import prepare
from likeness.flows.train import train
from likeness.settings import Settings
from likeness.tasks.common import fails_cleanly
from likeness.terminal import UI_ONLY
from likeness.tasks.evaluate.grid import read_eval_table
from likeness.workspace import Workspace


@dataclass(frozen=True)
class PipelineResult:
    """Where the run's products are."""

    chosen: Path
    source: Path
    reason: str
    report: Path
    grids: list[Path]
    checkpoints: list[Path]
    lora: Path | None = None  # the extracted (or trained) LoRA, with lora.extract on

    def summary(self) -> str:
        lora = [f"LoRA:              {self.lora}"] if self.lora else []
        return "\n".join([
            f"chosen checkpoint: {self.chosen}  (from {self.source.name})",
            f"why:               {self.reason}",
            f"report:            {self.report}",
            f"grids:             {', '.join(str(g) for g in self.grids)}",
            f"all checkpoints:   {', '.join(p.name for p in self.checkpoints)}",
            *lora,
        ])


def _no_subflow_heartbeats():
    """Stage subflows run in this flow's process, whose own heartbeat already says it is alive; each
    sync flow's heartbeat thread costs up to 1 s at its exit (it sleeps in 1 s steps), 4-5 s a run."""
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@flow(name="pipeline", log_prints=True)
@fails_cleanly
def pipeline(settings: Settings) -> PipelineResult:
    """Prepare the photos, train, evaluate every checkpoint, select the best one."""
    logger, ws = get_run_logger(), Workspace.from_settings(settings)
    with _no_subflow_heartbeats():
        prepare(settings)
        trained = train(settings)
        checkpoints = [c.path for c in trained.checkpoints]
        logger.info("trained: %s", trained.summary(), extra=UI_ONLY)  # the train task said it already
        evaluated = evaluate(settings, checkpoints=[str(p) for p in checkpoints])
        selected = read_eval_table(select(settings), ws)["extra"]
        lora = Path(read_eval_table(extract_lora(settings), ws)["extra"]["lora"]) if settings.lora.extract else None
    grids = read_eval_table(evaluated["grid"], ws)["extra"]["grids"]
    result = PipelineResult(chosen=Path(selected["copied"]), source=Path(selected["source"]),
                            reason=selected["reason"], report=Path(selected["report"]),
                            grids=[Path(g) for g in grids], checkpoints=checkpoints, lora=lora)
    logger.info("pipeline done:\n%s", result.summary(), extra=UI_ONLY)  # the CLI prints it
    return result


if __name__ == "__main__":
    from likeness.profiles import load_profile

    print(pipeline(load_profile(sys.argv[1] if len(sys.argv) > 1 else "demo-cpu", sys.argv[2:])).summary())
