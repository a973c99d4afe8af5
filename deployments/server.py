"""A local Prefect server for likeness (`likeness server`): loopback only unless asked, analytics off.

The server keeps its SQLite database in `$PREFECT_HOME/prefect.db`; for production point
`PREFECT_SERVER_DATABASE_CONNECTION_URL` at PostgreSQL
(`postgresql+asyncpg://user:password@host:5432/prefect`). Schedules and triggers (the watcher,
retrain-on-change) need this persistent server: its services run them.

    likeness server                       # http://127.0.0.1:4200
    proc = start_server(port=free_port(), home=tmp)   # in tests: a real server on a free port
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"


def server_command(host: str = LOOPBACK, port: int = 4200) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def server_env(host: str, port: int, home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the server process and of its clients: analytics off, the API on host:port."""
    env = dict(os.environ if base is None else base)
    env.update({
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api_url(host, port),
        "PREFECT_UI_API_URL": api_url(host, port),
    })
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def api_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/api"


def ui_url(host: str, port: int) -> str:
    return api_url(host, port).removesuffix("/api")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(host, port)}/health", timeout=2) as response:
            return json.loads(response.read()) is True
    except (OSError, ValueError):
        return False


def wait_healthy(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    """Block until the server answers /api/health; fail early if its process died."""
    deadline = time.monotonic() + timeout
    while not healthy(host, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {proc.returncode} before it was healthy")
        if time.monotonic() > deadline:
            raise TimeoutError(f"prefect server on {host}:{port} not healthy after {timeout:.0f} s")
        time.sleep(0.3)


def die_with_parent() -> None:
    """For `preexec_fn`: on Linux the child gets SIGTERM when the process that started it dies,
    so a killed test run or CLI leaves no server behind. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_server(host: str = LOOPBACK, port: int = 4200, home: Path | None = None,
                 log: Path | None = None, wait: bool = True) -> subprocess.Popen:
    """Start `prefect server start` in its own process group (so stopping it stops its children).

    Its output goes to `log`, or to this terminal when no log is given.
    """
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(server_command(host, port), env=server_env(host, port, home),
                            stdout=out, stderr=subprocess.STDOUT if log else None, start_new_session=True,
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    if wait:
        try:
            wait_healthy(host, port, proc)
        except Exception:
            stop(proc)
            raise
    return proc


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process started here and everything it started (SIGTERM to its group, then SIGKILL)."""
    import signal

    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
