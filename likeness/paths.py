"""Paths as a user types them, for every path setting (likeness/settings.py).

`~` and `$VARS` (or `${VARS}`) are expanded as a shell would, when the settings are validated: in a
profile, a `--set`, a Prefect form or a OneTrainer import alike. A variable that is not set is an
error naming it (a shell would silently make it empty). Relative paths stay relative and mean the
same thing everywhere: relative to the current directory of the process that runs likeness (the
folder you start `likeness` from), never to the profile file's folder.

Model settings (`model.base_model`, `masks.model`, ...) may be a hub id instead of a folder: they
are expanded the same way (a hub id has neither `~` nor `$`) and left as text.

    UserPath      a Path setting, expanded
    ModelRef      a folder, file or hub id, expanded
    absolute(p)   the folder a relative path means now (symlinks resolved), for comparisons
    nested(a, b)  True when folder a is b or lies inside it
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

RELATIVE_PATHS = "relative to the current directory (where you run likeness), not to the profile file"
_VARIABLE = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def expand_text(text: str) -> str:
    """`~`, `~user`, `$NAME` and `${NAME}` expanded; an unset variable raises ValueError naming it."""
    unset = [a or b for a, b in _VARIABLE.findall(text) if (a or b) not in os.environ]
    if unset:
        raise ValueError(f"${unset[0]} is not set (in {text!r}): set the environment variable or write the path out")
    expanded = os.path.expandvars(text)
    if expanded.startswith("~"):
        home = os.path.expanduser(expanded)
        if home.startswith("~"):
            raise ValueError(f"cannot expand {expanded.split('/')[0]!r} (no such user, or HOME is not set)")
        expanded = home
    return expanded


def _expand(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return expand_text(value) if isinstance(value, str) else value


UserPath = Annotated[Path, BeforeValidator(_expand)]
ModelRef = Annotated[str, BeforeValidator(_expand)]


def absolute(path: str | os.PathLike[str]) -> Path:
    """The absolute folder `path` means from the current directory, symlinks resolved."""
    return Path(path).expanduser().resolve()


def nested(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it (both absolute)."""
    return inner == outer or outer in inner.parents
