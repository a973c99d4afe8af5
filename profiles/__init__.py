"""Profiles: TOML files of settings, validated into `Settings`, with `--set key=value` overrides.

    settings = load_profile("demo-cpu", overrides=["training.epochs=3", "concepts[0].path=photos"])

A profile is a name from the `profiles/` folder (`demo-cpu`, `sdxl-person`) or the path of a TOML
file. Relative paths inside a profile are relative to the current directory, like command-line
arguments. Every problem is reported with its field path: `concepts[1].balancing: must be > 0`.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from likeness.errors import BadInputError
from likeness.files import write_atomic
from likeness.settings import Settings


class SettingsError(BadInputError, ValueError):
    """Invalid settings: one line per problem, each naming its field path."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid settings{where}:\n{lines}")


def profiles_dir() -> Path:
    """The folder of ready-made profiles shipped with the package."""
    return Path(str(resources.files("likeness.profiles")))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def profile_path(name_or_path: str | Path) -> Path:
    """Resolve a profile name (`demo-cpu`) or a TOML path to an existing file."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    named = profiles_dir() / f"{name_or_path}.toml"
    if candidate.suffix == "" and named.is_file():
        return named
    raise SettingsError(
        [f"profile {str(name_or_path)!r}: no such file or profile; "
         f"give a TOML path or one of: {', '.join(available_profiles())}"]
    )


def load_profile(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Settings:
    """Read a profile, apply `key=value` overrides, and validate it."""
    path = profile_path(name_or_path)
    data = profile_data(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_settings(data, source=str(path), overrides=overrides)


def profile_data(name_or_path: str | Path) -> dict[str, Any]:
    """The raw TOML data of a profile (name or path), not yet validated."""
    path = profile_path(name_or_path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"not valid TOML: {exc}"], source=str(path)) from None


def validate_settings(data: dict[str, Any], source: str | None = None, overrides: Iterable[str] = ()) -> Settings:
    """`Settings.model_validate` with errors rewritten as `field.path: what is wrong`.

    A problem in a field an override set names that override as its source, not the profile.
    """
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems, blamed = [], []
        for error in exc.errors():
            culprit = _override_of(error["loc"], overrides)
            problems.append(describe_error(error) + (f" (set by the override {culprit!r})" if culprit else ""))
            blamed.append(culprit)
        if blamed and all(blamed):
            named = list(dict.fromkeys(blamed))
            source = (f"the override{'s' if len(named) > 1 else ''} {', '.join(map(repr, named))}"
                      + (f" (on {source})" if source else ""))
        raise SettingsError(problems, source=source) from None


def _override_of(loc: Sequence[str | int], overrides: Iterable[str]) -> str | None:
    """The last override whose key is the field at `loc`, inside it, or around it."""
    found = None
    for assignment in overrides:
        try:
            key = parse_key_path(assignment.partition("=")[0].strip())
        except SettingsError:
            continue
        shorter = min(len(key), len(loc))
        if loc and list(key[:shorter]) == list(loc[:shorter]):
            found = assignment
    return found


# --- overrides -------------------------------------------------------------------------------


def parse_key_path(key: str) -> list[str | int]:
    """`concepts[1].caption.text` -> ['concepts', 1, 'caption', 'text'] (`concepts.1` works too)."""
    parts: list[str | int] = []
    for piece in key.replace("[", ".").replace("]", "").split("."):
        if piece == "":
            raise SettingsError([f"--set {key!r}: empty part in the key path"])
        parts.append(int(piece) if piece.isdigit() else piece)
    return parts


def parse_value(text: str) -> Any:
    """A TOML value (`3`, `1e-5`, `true`, `["head", "face"]`, `"x"`), else the text as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to the raw profile data, in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise SettingsError([f"--set {assignment!r}: expected key=value, e.g. training.epochs=3"])
    *parents, last = parse_key_path(key.strip())
    node: Any = data
    walked = ""
    for part in parents:
        walked = _join(walked, part)
        node = _step_into(node, part, walked)
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise SettingsError([f"{_join(walked, last)}: no such item to set"])
    elif not isinstance(node, dict):
        raise SettingsError([f"{_join(walked, last)}: {walked or 'settings'} is not a table"])
    node[last] = parse_value(raw.strip())


def _step_into(node: Any, part: str | int, walked: str) -> Any:
    if isinstance(part, int):
        if not isinstance(node, list) or part >= len(node):
            size = len(node) if isinstance(node, list) else 0
            raise SettingsError([f"{walked}: no such item (the profile has {size})"])
        return node[part]
    if not isinstance(node, dict):
        raise SettingsError([f"{walked}: the parent is not a table"])
    return node.setdefault(part, {})


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


# --- error messages --------------------------------------------------------------------------


def format_location(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        path = _join(path, part)
    return path


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "literal_error": "must be one of {expected}",
    "missing": "is required",
    "string_too_short": "must not be empty",
    "too_short": "needs at least {min_length} item(s)",
    "string_pattern_mismatch": "must match {pattern}",
}


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as `field.path: message (got value)`."""
    loc = list(error["loc"])
    kind = error["type"]
    template = _MESSAGES.get(kind)
    if kind == "extra_forbidden":
        message = "unknown field" + _suggestion(loc)
    elif template:
        message = template.format(**error.get("ctx", {}))
    else:
        message = error["msg"].removeprefix("Value error, ")
    if kind not in ("missing", "extra_forbidden", "value_error") and "input" in error:
        message += f" (got {error['input']!r})"
    path = format_location(loc)
    return f"{path}: {message}" if path else message


def _suggestion(loc: list[str | int]) -> str:
    known = _field_names(Settings, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known fields: {', '.join(known)}" if known else ""


def _field_names(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names of the model reached by following `loc` from `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside `X`, `list[X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# --- writing ---------------------------------------------------------------------------------


def settings_to_toml(settings: Settings, header: str = "") -> str:
    """Every setting as TOML (None values left out: they mean 'the default')."""
    body = tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True))
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + ("\n" if comment else "") + body


def write_profile(settings: Settings, path: str | Path, header: str = "") -> Path:
    return write_atomic(path, settings_to_toml(settings, header))
