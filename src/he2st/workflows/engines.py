"""Existing engines for many independent tasks (slides to predict, samples to embed): a local process
pool or Ray. Tasks return their outcome instead of raising, so one failure never stops the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from he2st.errors import He2stError

ENGINES = ("local", "ray")


def threads_per_worker(workers: int) -> int:
    """CPU threads each worker may use, so workers together do not oversubscribe the machine."""
    if workers < 1:
        raise He2stError(f"--workers must be at least 1, got {workers}")
    return max(1, (os.cpu_count() or 1) // workers)


def run_tasks(task: Callable[..., Any], arguments: list[tuple], engine: str, workers: int,
              address: str | None, on_done: Callable[[int, Any], None]) -> None:
    """Run ``task(*args)`` for every entry of ``arguments`` on ``engine`` with ``workers`` at once;
    ``on_done(i, result)`` as each finishes (in completion order). ``task`` must be importable (top level)."""
    threads = threads_per_worker(workers)
    if engine == "local":
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(task, *args): i for i, args in enumerate(arguments)}
            for future in as_completed(futures):
                on_done(futures[future], future.result())
        return
    if engine != "ray":
        raise He2stError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    try:
        import ray
    except ImportError as exc:
        raise He2stError("--engine ray needs ray: pip install 'he2st[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers * threads, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0  # a GPU per task where the cluster has them
        remote = ray.remote(num_cpus=threads, num_gpus=gpus)(task)
        pending = {remote.remote(*args): i for i, args in enumerate(arguments)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            on_done(pending.pop(done[0]), ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()
