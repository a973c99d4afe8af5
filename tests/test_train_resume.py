"""Resume: a training process killed (SIGKILL) after a backup, started again, ends with exactly the
weights of an uninterrupted run; half-written backups and backups of other settings are ignored."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from likeness.trainer.backup import list_backups
from likeness.workspace import Workspace

SCRIPT = """
import json, sys, time
from likeness.trainer.loop import train
from likeness.settings import Settings

settings = Settings.model_validate_json(open(sys.argv[1]).read())
delay = float(sys.argv[2])

class Slow:  # a metrics sink that makes each step last long enough to be killed in the middle
    def scalars(self, step, values): time.sleep(delay)
    def image(self, step, tag, image): pass
    def close(self): pass

result = train(settings, log=print, sinks=[Slow()])
print("RESULT " + json.dumps({"resumed": str(result.resumed_from), "steps": result.steps,
                              "final": str(result.final_checkpoint)}))
"""


def _start(config, delay):
    # One thread: the same float arithmetic in every run, and no threads spinning on a shared machine.
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(config), str(delay)], text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(train_settings, tmp_path):
    settings = train_settings(training={"epochs": 2}, sampling={"unit": "NEVER", "at_start": False},
                              saving={"unit": "NEVER"}, backups={"every": 3, "unit": "STEP", "rolling_count": 2})
    ws = Workspace.from_settings(settings)
    config = tmp_path / "settings.json"
    config.write_text(settings.model_dump_json())

    uninterrupted = _finish(_start(config, 0.0))
    assert uninterrupted["steps"] == 12 and uninterrupted["resumed"] == "None"
    expected = load_file(uninterrupted["final"])
    for folder in (ws.checkpoints, ws.backups, ws.reports):
        shutil.rmtree(folder)

    proc = _start(config, 0.4)
    deadline = time.monotonic() + 240
    while not list_backups(ws.backups) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not ws.checkpoints.exists() or not any(ws.checkpoints.iterdir())  # killed mid-run
    complete = list_backups(ws.backups)[-1]

    # A backup killed while being written (no objects.json) and one of other settings, both newer:
    half = ws.backups / "backup-000000010"
    half.mkdir()
    shutil.copy(complete.path / "unet.safetensors", half)
    (ws.backups / ".backup-x.tmp").mkdir()
    other = ws.backups / "backup-000000011"
    shutil.copytree(complete.path, other)
    record = json.loads((other / "progress.json").read_text())
    (other / "progress.json").write_text(json.dumps({**record, "fingerprint": "other settings"}))

    resumed = _finish(_start(config, 0.0))
    assert resumed["resumed"] == str(complete.path) and resumed["steps"] == 12
    weights = load_file(resumed["final"])
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    table = (ws.reports / "loss.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in table[1:]] == list(range(1, 13))  # losses of all steps
