"""The evaluate and select flows: checkpoints -> labelled grids + scores -> the chosen checkpoint.

`evaluate` generates every checkpoint (and the base model, the first column) x the evaluation
prompts x the same seeds, draws the grids and scores each checkpoint; `select` reads those scores
and copies the best checkpoint to the output destination with a report. Both are cached by
content: adding a checkpoint generates and scores only its column; a re-run with nothing changed
is all `Cached`.

    likeness evaluate --profile demo-cpu              # every checkpoint in workspace/save
    likeness select --profile demo-cpu
    python -m likeness.flows.evaluate PROFILE         # both, like the two commands
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from likeness.settings import Settings
from likeness.stages import StageResult
from likeness.tasks.common import fails_cleanly, run_stage
from likeness.tasks.compare_faces import FaceComparison, compare_faces_task
from likeness.tasks.evaluate.grid import EvaluationError, find_checkpoints, generate_grid
from likeness.tasks.evaluate.scores import score_checkpoints
from likeness.tasks.evaluate.select import scores_table, select_checkpoint
from likeness.workspace import Workspace


@flow(name="evaluate", log_prints=True)
@fails_cleanly
def evaluate(settings: Settings, checkpoints: list[str] | None = None) -> dict[str, StageResult]:
    """Grid and scores of the given checkpoints (default: every checkpoint in workspace/save)."""
    ws = Workspace.from_settings(settings)
    paths = [str(p) for p in (find_checkpoints(ws) if checkpoints is None else checkpoints)]
    if not paths:
        raise EvaluationError(f"no checkpoints to evaluate in {ws.checkpoints}: run `likeness train` first, "
                              "or pass checkpoint files")
    grid = run_stage(generate_grid, settings, ws, checkpoints=paths, settings=settings)
    scores = run_stage(score_checkpoints, settings, ws, grid=grid, settings=settings)
    return {"grid": grid, "scores": scores}


@flow(name="compare-faces", log_prints=True)
@fails_cleanly
def compare_faces(settings: Settings, reference: str, images: list[str], output: str | None = None) -> FaceComparison:
    """Face identity of any images (ours, A1111's, ComfyUI's) against the person's photos in `reference`:
    a table and a contact sheet with the face boxes, in `output` (default: workspace/faces)."""
    e = settings.evaluation
    folder = Path(output) if output else Workspace.from_settings(settings).root / "faces"
    return compare_faces_task(Path(reference), [Path(i) for i in images], folder,
                              None if e.face_detector is None else str(e.face_detector),
                              None if e.face_recognizer is None else str(e.face_recognizer), e.face_score_threshold)


@flow(name="select", log_prints=True)
@fails_cleanly
def select(settings: Settings) -> StageResult:
    """Pick one checkpoint from the scores `evaluate` wrote and copy it to settings.output_destination."""
    ws = Workspace.from_settings(settings)
    return run_stage(select_checkpoint, settings, ws, scores=scores_table(ws), selection=settings.evaluation.selection,
                     destination=settings.output_destination)


if __name__ == "__main__":
    from likeness.profiles import load_profile

    chosen = load_profile(sys.argv[1] if len(sys.argv) > 1 else "demo-cpu", sys.argv[2:])
    for result in evaluate(chosen).values():
        print(result.summary())
    print(select(chosen).summary())
