"""The run form of every deployment: what the Prefect UI's Custom run shows, and the one rule that
turns it into the run's settings.

The form has three parameters. `likeness serve --profile P` fills their defaults, so Custom run
opens on the served profile's values:

- **profile**: a dropdown of the available profiles (an `enum` in the parameter schema);
- **settings**: every setting, opened on the served profile's values (with `serve --set` applied);
- **overrides**: `key=value` changes, applied last.

The rule (docs/operations.md, "The run form"):

1. settings empty (None): the profile alone, overrides on top;
2. settings given, profile unchanged: exactly the form, overrides on top;
3. settings given, another profile chosen: that profile, plus the fields you changed in the form
   (compared with the values it opened on), overrides on top. Unchanged fields follow the profile.

The parameter schema of a served deployment is strict: unknown or ill-typed parameters, at any
level, are refused by the API (409) before a run exists.

    deployment = strict_form(flow.to_deployment(...), profile="demo-cpu")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ConfigDict
from prefect.utilities.callables import ParameterSchema

from likeness.profiles import available_profiles, format_location

F = TypeVar("F", bound=Callable[..., Any])

PROFILE_HELP = (
    "The profile the run starts from. Settings below open on this deployment's profile. Choose another "
    "profile and the run uses it, with the settings you changed in this form on top (fields you left "
    "alone follow the new profile). Set Settings to None to run a profile exactly as written."
)
SETTINGS_HELP = (
    "Every setting, opened on the served profile's values. With the profile unchanged the run uses "
    "exactly what this form shows; None: the profile alone."
)
OVERRIDES_HELP = "`key=value` changes applied last, on top of the profile and the form, e.g. `training.epochs=3`."



def form_parameters(fn: F) -> F:
    """Add the three form parameters' texts to a flow function's `Args:` block (the UI shows them)."""
    lines = [f"        profile: {PROFILE_HELP}", f"        settings: {SETTINGS_HELP}", f"        overrides: {OVERRIDES_HELP}"]
    doc = (fn.__doc__ or "").rstrip()
    if "\n    Args:\n" not in doc:
        doc += "\n\n    Args:"
    fn.__doc__ = doc + "\n" + "\n".join(lines) + "\n    "
    return fn


class StrictParameterSchema(ParameterSchema):
    """Prefect's parameter schema with `additionalProperties: false` at the top (its own model drops it)."""

    model_config = ConfigDict(extra="allow")


def strict_form(deployment: Any, profile: str) -> Any:
    """Make a runner deployment's parameter schema strict and its profile dropdown hold `profile`."""
    schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    choice = schema["properties"].get("profile")
    if choice is not None:
        choices = profile_choices(profile)
        for option in [choice, *choice.get("anyOf", [])]:
            if "enum" in option:
                option["enum"] = choices
    deployment._parameter_openapi_schema = StrictParameterSchema(**schema, additionalProperties=False)
    return deployment


def profile_choices(served: str | None = None) -> list[str]:
    """The dropdown: the shipped profiles, plus the served one when it is a TOML path."""
    names = available_profiles()
    return names + ([served] if served and served not in names else [])


# --- the rule --------------------------------------------------------------------------------


def changed_fields(opened: Any, submitted: Any, path: tuple[str | int, ...] = ()) -> dict[str, Any]:
    """`{"training.epochs": 3}`: the leaves of `submitted` that differ from `opened` (lists are leaves)."""
    if isinstance(opened, dict) and isinstance(submitted, dict):
        changed: dict[str, Any] = {}
        for key, value in submitted.items():
            if key not in opened:
                changed[format_location([*path, key])] = value
            else:
                changed.update(changed_fields(opened[key], value, (*path, key)))
        return changed
    return {} if opened == submitted else {format_location(path): submitted}


def apply_changes(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of raw settings data with each dotted field of `changes` set (tables created as needed)."""
    result = copy.deepcopy(data)
    for dotted, value in changes.items():
        *parents, last = dotted.replace("[", ".").replace("]", "").split(".")
        node = result
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return result


def describe_changes(changes: dict[str, Any], limit: int = 8) -> str:
    shown = [f"{key}={value!r}" for key, value in list(changes.items())[:limit]]
    more = len(changes) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
