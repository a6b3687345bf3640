"""Engines for many independent tasks (slides to predict, samples to embed, benchmark folds x methods): a
local process pool or Ray. Tasks return their outcome instead of raising, so one failure never stops the
others; an exception that does escape a task stops the pool (pending tasks are cancelled) and is raised."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from he2st.errors import He2stError

ENGINES = ("local", "ray")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_worker(workers: int) -> int:
    """CPU threads each worker may use, so workers together do not oversubscribe the machine."""
    if workers < 1:
        raise He2stError(f"--workers must be at least 1, got {workers}")
    return max(1, (os.cpu_count() or 1) // workers)


def limit_threads(threads: int) -> None:
    """Hold this process (a worker) to ``threads`` CPU threads: torch's pool, the BLAS and OpenMP pools already
    loaded (threadpoolctl) and, through the environment, any loaded later."""
    import torch
    from threadpoolctl import threadpool_limits

    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(threads)


def run_tasks(task: Callable[..., Any], arguments: list[tuple], engine: str, workers: int,
              address: str | None, on_done: Callable[[Any], None] | None = None,
              threads: int | None = None) -> list[Any]:
    """Run ``task(*args, threads)`` for every entry of ``arguments`` on ``engine`` with ``workers`` at once
    (``threads``: the CPU threads each may use, by default the cores shared among the workers);
    ``on_done(result)`` as each finishes. Returns the results in input order. ``task`` must be importable."""
    threads = threads or threads_per_worker(workers)
    results: dict[int, Any] = {}

    def record(i: int, result: Any) -> None:
        results[i] = result
        if on_done is not None:
            on_done(result)

    if engine == "local":
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(task, *args, threads): i for i, args in enumerate(arguments)}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result())
            except BaseException:  # a task's exception or an interrupt: tasks not started are dropped
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return [results[i] for i in range(len(arguments))]
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
        pending = {remote.remote(*args, threads): i for i, args in enumerate(arguments)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            record(pending.pop(done[0]), ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()
    return [results[i] for i in range(len(arguments))]
