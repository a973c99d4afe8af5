"""The GPU step benchmark runs (in --tiny mode, on the CPU) and prints its figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_step_benchmark_runs_tiny_on_the_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--tiny", "--steps", "2", "--warmup", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny SDXL" in out.stdout and "TFLOPs per step (FlopCounterMode)" in out.stdout
    rows = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and "variant" not in line}
    assert {"reference", "checkpointing", "fused", "factor_conv", "compile"} <= rows


@pytest.mark.slow
def test_gpu_step_refuses_to_run_full_size_without_cuda():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--tiny" in out.stderr
