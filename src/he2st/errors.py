"""One error type for bad user input, so the CLI can print it as one line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


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
