"""One local Prefect server shared by every `likeness` command, started once and kept while in use.

Without `PREFECT_API_URL`, Prefect starts a temporary server inside each process (8-20 s on a
2-core machine, on every command) and throws it away at exit. The CLI instead connects to a
running local server: a `likeness server` that is up, or one it starts itself the first time,
detached, bound to 127.0.0.1 on a free port, with its SQLite database in `$PREFECT_HOME` (so the
runs stay visible in the UI). That server is watched by a small keeper process that stops it
after `LIKENESS_SERVER_IDLE_MINUTES` (default 30) with no `likeness` command running.

Where it is: `$PREFECT_HOME/likeness-server/server.json` (`{"pid", "url", "idle_minutes"}`), and
one file per command using it in `clients/<pid>` (the keeper counts live ones). A stale file (a
dead server) is ignored and replaced.

    LIKENESS_SERVER=off likeness prepare        # the old behaviour: a temporary server per command
    url = connect()                             # the API URL to use (starts the server if needed)
    python -m likeness.deployments.local_server --port 4321 --idle-minutes 30   # the keeper
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from likeness.deployments.server import LOOPBACK, api_url, free_port, healthy, start_server, stop

IDLE_MINUTES = 30.0
START_TIMEOUT = 120.0


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_dir(home: Path | None = None) -> Path:
    return (home or prefect_home()) / "likeness-server"


def enabled() -> bool:
    """Off with LIKENESS_SERVER=off (or 0/false/no): each command gets Prefect's temporary server."""
    return os.environ.get("LIKENESS_SERVER", "auto").strip().lower() not in ("off", "0", "false", "no")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def profile_api_url(home: Path | None = None) -> str | None:
    """PREFECT_API_URL of the active Prefect profile (`prefect config set ...`), read without importing Prefect."""
    import tomllib

    try:
        data = tomllib.loads(((home or prefect_home()) / "profiles.toml").read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def read_state(home: Path | None = None) -> dict | None:
    """The recorded server if it answers /api/health, else None."""
    try:
        state = json.loads((state_dir(home) / "server.json").read_text())
        host, port = state["host"], int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if healthy(host, port) else None


def write_state(host: str, port: int, pid: int, home: Path | None = None, **extra: object) -> Path:
    folder = state_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "server.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": pid, "url": api_url(host, port), **extra}))
    os.replace(tmp, path)
    return path


def clear_state(pid: int, home: Path | None = None) -> None:
    """Remove server.json if it still names `pid` (a newer server may have replaced it)."""
    path = state_dir(home) / "server.json"
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def register_client(home: Path | None = None, pid: int | None = None) -> Path:
    """Mark this process as using the server (the keeper keeps it up while the process lives)."""
    folder = state_dir(home) / "clients"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / str(pid or os.getpid())
    path.touch()
    return path


def live_clients(home: Path | None = None) -> int:
    count = 0
    for entry in (state_dir(home) / "clients").glob("*"):
        if entry.name.isdigit() and _pid_alive(int(entry.name)):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return count


def connect(home: Path | None = None, idle_minutes: float | None = None, log=None) -> str:
    """The API URL of a running local server, starting a detached one (with its keeper) if none is up."""
    home = home or prefect_home()
    state = read_state(home)
    if state is None:
        state = _start_detached(home, idle_minutes or float(os.environ.get("LIKENESS_SERVER_IDLE_MINUTES", IDLE_MINUTES)),
                                log)
    register_client(home)
    return state["url"]


def _start_detached(home: Path, idle_minutes: float, log) -> dict:
    import fcntl

    folder = state_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "start.lock", "w") as lock:  # two commands at once start one server
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(home)
        if state is not None:
            return state
        port = free_port()
        if log:
            log(f"starting a local Prefect server on http://{LOOPBACK}:{port} (kept {idle_minutes:g} min after "
                f"the last command; LIKENESS_SERVER=off to not)")
        with open(folder / "server.log", "ab") as out:
            keeper = subprocess.Popen(
                [sys.executable, "-m", "likeness.deployments.local_server", "--port", str(port),
                 "--idle-minutes", str(idle_minutes), "--home", str(home)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while (state := read_state(home)) is None:
            if keeper.poll() is not None:
                raise RuntimeError(f"the local Prefect server did not start (see {folder / 'server.log'}); "
                                   "LIKENESS_SERVER=off runs each command on a temporary server instead")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local Prefect server was not healthy after {START_TIMEOUT:.0f} s "
                                   f"(see {folder / 'server.log'})")
            time.sleep(0.2)
        return state


def keep(port: int, idle_minutes: float, home: Path, poll: float = 5.0) -> None:
    """The keeper: run the server, stop it once no client lived for `idle_minutes`."""
    proc = start_server(LOOPBACK, port, home=home, log=None, wait=True)
    write_state(LOOPBACK, port, os.getpid(), home, server_pid=proc.pid, idle_minutes=idle_minutes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    last_used = time.monotonic()
    try:
        while proc.poll() is None:
            if live_clients(home):
                last_used = time.monotonic()
            elif time.monotonic() - last_used > 60 * idle_minutes:
                break
            time.sleep(poll)
    finally:
        clear_state(os.getpid(), home)
        stop(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Keep a local Prefect server while likeness commands use it.")
    parser.add_argument("--port", type=int)
    parser.add_argument("--stop", action="store_true", help="Stop the kept server (if one is up) and exit.")
    parser.add_argument("--idle-minutes", type=float, default=IDLE_MINUTES)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args(argv)
    home = args.home or prefect_home()
    if args.stop:
        stop_kept(home)
    elif args.port is None:
        parser.error("--port is needed to start a server")
    else:
        keep(args.port, args.idle_minutes, home)


def stop_kept(home: Path | None = None) -> bool:
    """Stop the server a keeper started (SIGTERM to the keeper, which stops its server); False if none."""
    state = read_state(home)
    if state is None or "server_pid" not in state:
        return False
    os.kill(int(state["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _pid_alive(int(state["pid"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


if __name__ == "__main__":
    main()
