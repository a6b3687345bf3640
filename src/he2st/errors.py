"""One error type for bad user input, so the CLI can print it as one line and exit non-zero."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError


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


def one_line(exc: ValidationError, what: str, path: str | Path | None = None) -> He2stError:
    """The first problem of a pydantic ``ValidationError`` as one line: ``<what> <field>[=<value>]: <message>``.

    pydantic's own text spans several lines and lists every error; users fix one setting at a time, so the
    first one, named by its dotted field and (when short) the value given, is what the CLI prints."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    value = first.get("input")
    if first["loc"] and isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        where += f"={value!r}"
    message = " ".join(str(first["msg"]).split())  # one line, whatever a validator wrote
    return He2stError(f"{what} {where}: {message}", path)


T = TypeVar("T")


def for_validator(check: Callable[..., T], *args: Any) -> T:
    """``check(*args)`` inside a pydantic validator: its He2stError raised as the ValueError pydantic turns into
    the model's validation error, so the one line (:func:`one_line`) names the field as well as the problem."""
    try:
        return check(*args)
    except He2stError as exc:
        raise ValueError(str(exc)) from exc
