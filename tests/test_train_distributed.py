"""Two CPU processes (gloo, the environment `accelerate launch` sets up): each trains its slice of
every batch, gradients are averaged, and both end with the same weights after the promised steps."""

import json
import os
import socket
import subprocess
import sys

import pytest

SCRIPT = """
import hashlib, json, sys
import torch
from likeness.trainer import loop
from likeness.trainer.epoch_sampler import steps_per_epoch
from likeness.settings import Settings

settings = Settings.model_validate_json(open(sys.argv[1]).read())
seen = {}
real_load_models = loop.load_models
def load_models(*args):
    seen["pipe"], trained = real_load_models(*args)
    return seen["pipe"], trained
loop.load_models = load_models
lines = []
result = loop.train(settings, log=lines.append)
digest = hashlib.sha256()
for p in list(seen["pipe"].unet.parameters()) + list(seen["pipe"].text_encoder.parameters()):
    digest.update(p.detach().numpy().tobytes())
from likeness.trainer.train_data import TrainData
from likeness.workspace import Workspace
concepts = TrainData(Workspace.from_settings(settings), settings).concepts
print("RESULT " + json.dumps({"rank": torch.distributed.get_rank(), "world": torch.distributed.get_world_size(),
      "steps": result.steps, "promised": steps_per_epoch(concepts, settings.training.batch_size, 2),
      "weights": digest.hexdigest(), "lines": lines}))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_same_weights_in_the_promised_steps(train_settings, tmp_path):
    settings = train_settings(training={"epochs": 2}, sampling={"unit": "NEVER", "at_start": False},
                              backups={"unit": "NEVER"})
    config = tmp_path / "settings.json"
    config.write_text(settings.model_dump_json())
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(config)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    assert sorted((r["rank"], r["world"]) for r in results) == [(0, 2), (1, 2)]
    # 3 person + 3 regularization samples an epoch, one each per process: 3 optimizer steps an epoch
    assert results[0]["promised"] == 3 and all(r["steps"] == 2 * r["promised"] for r in results)
    assert results[0]["weights"] == results[1]["weights"]  # gradients were averaged: one model
    main = next(r for r in results if r["rank"] == 0)
    assert any("fused_back_pass is off with several processes" in line for line in main["lines"])
    assert not next(r for r in results if r["rank"] == 1)["lines"]  # process 0 alone reports
