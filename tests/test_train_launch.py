"""Several processes really launched: `accelerate launch --multi_gpu --num_processes 2 -m likeness.trainer.loop
PROFILE` with run.device = cpu (the command docs/kubernetes.md gives: torchrun under accelerate, gloo)
trains the promised steps and both processes end with the same weights (the run compares the
weights' digests of every process and says so, or fails).

`accelerate launch --cpu --num_processes 2` is not it: accelerate 1.x's --cpu launcher starts ONE
process unless an MPI hostfile is given."""

import os
import re
import socket
import subprocess
import sys

import pytest
import tomli_w

from likeness.profiles import load_profile


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(train_settings, tmp_path):
    settings = train_settings(training={"epochs": 1}, sampling={"unit": "NEVER", "at_start": False},
                              backups={"unit": "NEVER"})
    profile = tmp_path / "two-processes.toml"
    profile.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    assert load_profile(profile) == settings
    # `accelerate launch ...`, run by this interpreter
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
               "-m", "likeness.trainer.loop", str(profile)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    # 3 person + 3 regularization samples an epoch, one each per process: 3 steps an epoch
    assert re.search(r"training unet.* for 1 epochs, 3 steps on cpu \(2 process\(es\)\)", out), out[-3000:]
    assert re.search(r"weights identical on all 2 processes \(sha256 [0-9a-f]{16}\)", out), out[-3000:]
    assert out.count("train: 3 steps, 1 epochs") == 1, out[-3000:]  # process 0 alone reports
