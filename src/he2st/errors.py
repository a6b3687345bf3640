"""One error type for bad user input, so the CLI can print it as one line and exit non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError


class He2stError(Exception):
    """A problem with the user's input or environment that he2st can explain in one line.

    The message always names the file (or setting) and the problem; the CLI prints
    ``error: <message>`` and exits with status 2 instead of a traceback.
    """

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class He2stWarning(UserWarning):
    """Something he2st worked around (e.g. an encoder that falls back to torch), said in one line."""


def one_line(exc: ValidationError, what: str, path: str | Path | None = None,
             model: type[BaseModel] | None = None) -> He2stError:
    """The first problem of a pydantic ``ValidationError`` as one line: ``<what> <field>[=<value>]: <message>``.

    pydantic's own text spans several lines and lists every error; users fix one setting at a time, so the
    first one, named by its dotted field and (when short) the value given, is what the CLI prints. With the
    validated ``model``, an unknown key names the known key closest to it, as a misspelling usually is."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    value = first.get("input")
    if first["loc"] and isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        where += f"={value!r}"
    message = " ".join(str(first["msg"]).split())  # one line, whatever a validator wrote
    if first["type"] == "extra_forbidden" and model is not None and first["loc"]:
        message = "unknown setting" + _close_key(model, first["loc"])
    return He2stError(f"{what} {where}: {message}", path)


def _close_key(model: type[BaseModel], loc: tuple) -> str:
    """``; did you mean '<key>'?`` for the known key nearest the unknown ``loc[-1]``, or ``""``; the
    section holding it is found by following ``loc`` through the model's fields (list indices skipped)."""
    section: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(part) if _is_model(section) else None
        if field is None:
            return ""
        section = next((t for t in (field.annotation, *get_args(field.annotation), *(
            a for t in get_args(field.annotation) for a in get_args(t))) if _is_model(t)), None)
    if not _is_model(section):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


T = TypeVar("T")


def for_validator(check: Callable[..., T], *args: Any) -> T:
    """``check(*args)`` inside a pydantic validator: its He2stError raised as the ValueError pydantic turns into
    the model's validation error, so the one line (:func:`one_line`) names the field as well as the problem."""
    try:
        return check(*args)
    except He2stError as exc:
        raise ValueError(str(exc)) from exc
