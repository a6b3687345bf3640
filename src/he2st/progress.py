"""Progress bars that show on a terminal and stay silent in CI logs and pipes."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def progress_bar(total: int | None, description: str) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, total=None)`` (``total`` sets the bar's total once the caller knows it); renders a
    bar with the count and the time remaining only when stderr is an interactive terminal."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not interactive(), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        yield advance


def say(line: str) -> None:
    """A progress line (e.g. one per training epoch) on an interactive terminal; silent in logs and pipes."""
    if interactive():
        console.print(line, highlight=False)


def quiet_libraries() -> None:
    """Keep libraries' own log lines off the terminal in this process (the command's, or a worker's): tifffile
    logs what it finds wrong in a damaged TIFF on lines of its own, where he2st says it in one error line."""
    import logging

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
