"""Where a fit's independent inner fits run: the ensemble's inner-fold fits and final refits, and the copies
a reliability estimate fits on inner folds.

They run one after another in this process unless the calling workflow hands a runner
(:func:`inner_tasks`) that spreads them over a process pool or a Ray cluster. The methods layer only asks
for its fits to be mapped; which engine maps them is the workflow's choice, so a method never depends on
an engine. Each fit seeds itself from its own options, so where it runs changes nothing but its CPU
threads (which neural fits sum over in a different order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: ``runner(task, arguments)``: ``task(*args)`` for every entry of ``arguments``, the results in input order
TaskRunner = Callable[[Callable[..., Any], list[tuple]], list[Any]]

_RUNNER: ContextVar[TaskRunner | None] = ContextVar("he2st_inner_runner", default=None)


@contextmanager
def inner_tasks(runner: TaskRunner | None) -> Iterator[None]:
    """Within this block, :func:`map_fits` hands its fits to ``runner`` (None: runs them here)."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def runs_in_parallel() -> bool:
    """Whether :func:`map_fits` hands its fits to a runner here (a pool or a cluster) rather than running them
    one after another."""
    return _RUNNER.get() is not None


def map_fits(task: Callable[..., Any], arguments: list[tuple], expected: list[float] | None = None) -> list[Any]:
    """``task(*args)`` for every entry of ``arguments``, results in input order: on the runner of
    :func:`inner_tasks` when one is set and there is more than one, else here one after another. ``task`` must
    be importable (a module-level function) and its arguments picklable. The tasks' own inner fits run where
    they run. ``expected``: each task's expected duration (any unit); a runner receives the tasks longest
    first, so that its workers run out of work together (ties keep their order).

    Here, each entry is let go of as soon as its task has run (the list is emptied as it goes), so a
    model fitted by one task does not live on beside the next task's fit."""
    if expected is not None and len(expected) != len(arguments):
        raise ValueError(f"{len(expected)} expected durations for {len(arguments)} tasks")
    runner = _RUNNER.get()
    if runner is None or len(arguments) < 2:
        results = []
        for k in range(len(arguments)):
            args, arguments[k] = arguments[k], None  # rebinding lets the previous entry go
            results.append(task(*args))
        return results
    order = sorted(range(len(arguments)), key=lambda k: -expected[k]) if expected else list(range(len(arguments)))
    with inner_tasks(None):
        results = runner(task, [arguments[k] for k in order])
    placed: list[Any] = [None] * len(arguments)
    for k, result in zip(order, results, strict=True):
        placed[k] = result
    return placed
