"""What the terminal shows: likeness's own progress and results, each once.

Libraries talk a lot on a first run: diffusers/transformers progress bars (`Loading weights`,
`Loading pipeline components`, `Writing model shards`), deprecation and fallback warnings, the
telemetry of a temporary Prefect server, and Prefect's own tracebacks and state lines for an
error that likeness already explains. The CLI calls, in this order:

    quiet_environment(debug)   # before torch, diffusers or prefect are imported
    quiet_libraries(debug)     # once they are, before the first flow or model load
    quiet_prefect_console(debug)

Library warnings and log lines are re-logged at DEBUG on the `likeness.library` logger (visible
with `--debug` / `LIKENESS_DEBUG=1`, which leaves every library as it is). No Prefect import here:
the console filter works on plain `logging` records.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import types
import warnings

from likeness.errors import BadInputError

# Set before the libraries read them (at import). Analytics stays off in debug mode too: the
# temporary server the CLI starts otherwise logs "Failed to send telemetry" when offline.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # import-time notices (torchvision fallbacks) come before quiet_libraries
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# The temporary server of a run without PREFECT_API_URL: Prefect gives it 20 s to start, which a
# busy 2-core machine misses (a traceback before any work).
ALWAYS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
LIBRARY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "py.warnings")
DEBUG_LOGGER = "likeness.library"
# A record with `extra={"console": False}` goes to the Prefect UI but not to this terminal (the CLI
# prints that result itself).
UI_ONLY = {"console": False}

# Messages of bad-input errors already turned into a Failed state (`fails_cleanly`): Prefect's
# "Finished in state Failed('...')" lines repeat them, the CLI prints them once itself.
_reported: set[str] = set()


def quiet_environment(debug: bool) -> None:
    """Environment defaults that quiet the libraries (a user's own settings win); also for subprocesses."""
    for name, value in (ALWAYS if debug else ALWAYS | QUIET_ENVIRONMENT).items():
        os.environ.setdefault(name, value)


class _ToDebug(logging.Handler):
    """Re-log a library's record at DEBUG on `likeness.library`, where only `--debug` looks."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(DEBUG_LOGGER).debug("%s: %s", record.name, record.getMessage())


def quiet_libraries(debug: bool) -> None:
    """No library progress bars; library warnings and logs routed to DEBUG (nothing changes in debug mode).

    diffusers and transformers are quieted when they are imported, not imported here: a cached run
    never loads a model and should not pay their ~5 s of imports.
    """
    if debug:
        return
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        _route_to_debug(name)
    warnings.filterwarnings("default", category=FutureWarning)  # shown once each, and routed above
    for module in _LIBRARY_LOGGING_MODULES:
        if module in sys.modules:
            _quiet_library(sys.modules[module])
        elif not any(isinstance(finder, _QuietOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _QuietOnImport())


_LIBRARY_LOGGING_MODULES = ("diffusers.utils.logging", "transformers.utils.logging")


def _route_to_debug(name: str) -> None:
    logger = logging.getLogger(name)
    logger.handlers = [_ToDebug()]
    logger.propagate = False


def _quiet_library(library_logging: types.ModuleType) -> None:
    library_logging.disable_progress_bar()
    library_logging.get_logger()  # makes the library attach its own stderr handler now, so it can be removed
    library_logging.set_verbosity_warning()
    _route_to_debug(library_logging.__name__.split(".")[0])


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Quiets diffusers' / transformers' logging module right after it is first imported."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname not in _LIBRARY_LOGGING_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            _quiet_library(module)

        spec.loader.exec_module = exec_module
        return spec


def report_cleanly(message: str) -> None:
    """Remember a bad-input message turned into a Failed state: Prefect's console echoes of it are dropped."""
    _reported.add(message)


def _bad_input_names() -> set[str]:
    names, todo = set(), [BadInputError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


_EXCEPTION_IN_STATE = re.compile(r"encountered an exception:? (\w+):")


class ConsoleFilter(logging.Filter):
    """Drops from the terminal what likeness says better itself (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if record.exc_info and isinstance(record.exc_info[1], BadInputError):
            return False  # Prefect's "Task run failed with exception" + traceback
        message = record.getMessage()
        found = _EXCEPTION_IN_STATE.search(message)
        if found and found.group(1) in _bad_input_names():
            return False  # "Finished in state Failed('Task run encountered an exception ScanError: ...')"
        # state lines show the message as repr(): newlines escaped
        return not any(text in message or repr(text)[1:-1] in message for text in _reported)


def quiet_prefect_console(debug: bool) -> None:
    """Put `ConsoleFilter` on the terminal handlers Prefect configured (call after importing prefect)."""
    if debug:
        return
    for name in (None, "uvicorn", "fastapi"):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                    isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())
