"""The extract-lora flow: the checkpoint `select` chose, minus the base model, as one LoRA file.

Runs after select (the pipeline runs it when `lora.extract = true`); alone, it reads the selection
already on disk.

    python -m likeness.flows.lora PROFILE [key=value ...]
"""

from __future__ import annotations

import sys

from prefect import flow

from likeness.settings import Settings
from likeness.stages import StageResult
from likeness.tasks.common import run_stage
from likeness.tasks.extract_lora import extract_lora_task, selected_table
from likeness.workspace import Workspace


@flow(name="extract-lora", log_prints=True)
def extract_lora(settings: Settings) -> StageResult:
    """Extract a LoRA (settings.lora: rank, dtype) from the selected checkpoint into the output destination."""
    ws = Workspace.from_settings(settings)
    return run_stage(extract_lora_task, settings, ws, selected=selected_table(ws), settings=settings)


if __name__ == "__main__":
    from likeness.profiles import load_profile

    print(extract_lora(load_profile(sys.argv[1] if len(sys.argv) > 1 else "demo-cpu", sys.argv[2:])).summary())
