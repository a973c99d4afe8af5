"""Where the seconds of a `likeness` command go (issue 18): imports, server start, flow and task
overhead, model loads, and the wall time of the commands users repeat, side by side with the goals.
A script that prints figures (medians of `--repeat` runs, each in a fresh process), not a test.

    .venv/bin/python bench/startup.py                      # everything, ~10 min on 2 cores
    .venv/bin/python bench/startup.py --repeat 5 --out /tmp/startup --only imports,commands

Commands run in OUT (the demo profile's relative paths land there) twice: with the shared local
server (`LIKENESS_SERVER=auto`, the default; one server started before the timed runs, as a user's
first command leaves it) and with `LIKENESS_SERVER=off` (Prefect's temporary server per process,
the behaviour before issue 18). The first `likeness demo` (training included) is run once, untimed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["typer", "pydantic", "pandas", "pandera", "prefect", "transformers", "torch", "diffusers",
            "likeness.cli", "likeness.flows.pipeline"]
GOALS = {"--help": 0.5, "demo re-run": 10.0, "prepare no-change": 5.0, "select other rule": 5.0}

FLOW_SCRIPT = """
import time
t0 = time.perf_counter()
from prefect import flow, task
t1 = time.perf_counter()

@task
def nothing(x):
    return x

@flow
def empty():
    return 1

@flow
def with_tasks(n):
    return [nothing(i) for i in range(n)]

a = time.perf_counter(); empty(); b = time.perf_counter(); empty(); c = time.perf_counter()
with_tasks(10); d = time.perf_counter()
print(f"RESULT {t1 - t0} {b - a} {c - b} {(d - c - (c - b)) / 10}")
"""

MODEL_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import torch
from likeness.models.loading import load_pipeline
t1 = time.perf_counter()
load_pipeline(sys.argv[1], "sdxl", torch_dtype=torch.float32)
t2 = time.perf_counter()
from transformers import AutoModel
AutoModel.from_pretrained(sys.argv[2])
t3 = time.perf_counter()
print(f"RESULT {t1 - t0} {t2 - t1} {t3 - t2}")
"""


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def result_line(command: list[str], env: dict[str, str], cwd: Path | None = None) -> list[float]:
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout
    return [float(v) for v in next(line for line in out.splitlines() if line.startswith("RESULT "))[7:].split()]


def bench_imports(repeat: int, env: dict[str, str]) -> None:
    print(f"\nimport time in a fresh process (median of {repeat}):")
    for name in PACKAGES:
        code = f"import time; t = time.perf_counter(); import {name}; print('RESULT', time.perf_counter() - t)"
        seconds = statistics.median(result_line([sys.executable, "-c", code], env)[0] for _ in range(repeat))
        print(f"  {name:26s} {seconds:6.2f} s")


def bench_server(repeat: int, env: dict[str, str], out: Path) -> None:
    from likeness.deployments.server import free_port, start_server, stop

    print(f"\nPrefect server and flow overhead (median of {repeat}):")
    starts = []
    for i in range(repeat):
        home = out / f"server-home-{i}"
        shutil.rmtree(home, ignore_errors=True)
        start = time.perf_counter()
        proc = start_server(port=free_port(), home=home, log=out / "server.log")
        starts.append(time.perf_counter() - start)
        stop(proc)
    print(f"  `prefect server start` until healthy (new database)  {statistics.median(starts):6.2f} s")

    port = free_port()
    home = out / "server-home-flows"
    proc = start_server(port=port, home=home, log=out / "server.log")
    try:
        for label, extra in (("temporary server (no PREFECT_API_URL)", {"PREFECT_API_URL": ""}),
                             ("running server", {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})):
            run_env = {**env, **extra, "PREFECT_HOME": str(home)}
            if not extra["PREFECT_API_URL"]:
                run_env.pop("PREFECT_API_URL")
                run_env["PREFECT_HOME"] = str(out / "ephemeral-home")
            rows = [result_line([sys.executable, "-c", FLOW_SCRIPT], run_env) for _ in range(repeat)]
            imp, first, second, per_task = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"  {label}: import prefect {imp:.2f} s, first flow {first:.2f} s, next flow {second:.2f} s, "
                  f"a task {per_task * 1000:.0f} ms")
    finally:
        stop(proc)


def bench_models(repeat: int, env: dict[str, str], models: Path) -> None:
    rows = [result_line([sys.executable, "-c", MODEL_SCRIPT, str(models / "sdxl"), str(models / "clip")], env)
            for _ in range(repeat)]
    imp, sdxl, clip = (statistics.median(col) for col in zip(*rows, strict=True))
    print(f"\nmodel loads (tiny models; median of {repeat}): import torch+diffusers {imp:.2f} s, "
          f"SDXL pipeline {sdxl:.2f} s, CLIP {clip:.2f} s")


def bench_commands(repeat: int, env: dict[str, str], out: Path) -> None:
    cli = [sys.executable, "-m", "likeness"]
    home = out / "prefect-home"
    base_env = {**env, "PREFECT_HOME": str(home), "LIKENESS_SERVER_IDLE_MINUTES": "10"}
    base_env.pop("PREFECT_API_URL", None)
    print("\nfirst `likeness demo` (trains; untimed) ...", flush=True)
    timed([*cli, "demo"], out, base_env)
    other_rule = ["--set", "evaluation.selection.rule=epoch", "--set", "evaluation.selection.epoch=2"]
    commands = {"--help": [*cli, "--help"], "demo re-run": [*cli, "demo"], "prepare no-change": [*cli, "prepare"],
                "select other rule": [*cli, "select", *other_rule]}
    figures: dict[str, dict[str, float]] = {}
    for mode in ("auto", "off"):
        mode_env = {**base_env, "LIKENESS_SERVER": mode}
        for name, command in commands.items():
            if name == "select other rule":  # alternate rules so every timed run really selects
                rules = [other_rule, []]
                seconds = statistics.median(timed([*cli, "select", *rules[i % 2]], out, mode_env) for i in range(repeat))
            else:
                seconds = median_of(repeat, lambda c=command: timed(c, out, mode_env))
            figures.setdefault(name, {})[mode] = seconds
    print(f"\ncommand wall time (median of {repeat}; shared server already up vs a temporary one per command):")
    print(f"  {'command':20s} {'shared':>8s} {'temporary':>10s} {'goal':>6s}  ratio")
    for name, row in figures.items():
        goal = GOALS[name]
        verdict = "ok" if row["auto"] <= goal else "MISSED"
        print(f"  {name:20s} {row['auto']:7.2f}s {row['off']:9.2f}s {goal:5.1f}s  {row['off'] / row['auto']:4.1f}x  {verdict}")
    subprocess.run([sys.executable, "-m", "likeness.deployments.local_server", "--stop", "--home", str(home)],
                   env=base_env, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "likeness-startup-bench")
    parser.add_argument("--only", default="imports,server,models,commands")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    parts = set(args.only.split(","))
    if "imports" in parts:
        bench_imports(args.repeat, env)
    if "server" in parts:
        bench_server(args.repeat, env, args.out)
    if "commands" in parts:
        bench_commands(args.repeat, env, args.out)
    if "models" in parts:
        bench_models(args.repeat, env, args.out / "workspace" / "demo" / "models")


if __name__ == "__main__":
    main()
