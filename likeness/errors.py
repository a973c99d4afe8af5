"""The one kind of error a user fixes by changing their photos, settings or workspace.

Every such error (a broken photo, a bad `--set` value, a missing earlier stage, a manifest that
does not validate, a OneTrainer config likeness cannot import) derives from `BadInputError`. Its
message is complete: it names each bad file or field and says what to do. So the CLI prints the
message once and exits 2, without a traceback, and a Prefect run ends `Failed` with the message as
its state message (`likeness.tasks.common.fails_cleanly`); nothing retries it.

`--debug` (or `LIKENESS_DEBUG=1`) shows the traceback as well:

    LIKENESS_DEBUG=1 likeness prepare --profile me.toml
"""

from __future__ import annotations

import os

DEBUG_VARIABLE = "LIKENESS_DEBUG"


class BadInputError(Exception):
    """A problem with the user's input that retrying cannot fix and the message explains."""


def debug_enabled() -> bool:
    """Whether the user asked for tracebacks and library output (`--debug` or `LIKENESS_DEBUG=1`)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")
