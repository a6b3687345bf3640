"""Engines for many independent tasks (slides to predict, samples to embed, benchmark folds x methods): a
local process pool or Ray. Tasks return their outcome instead of raising, so one failure never stops the
others; an exception that does escape a task stops the map (its pending tasks are cancelled) and is raised."""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from he2st.errors import He2stError
from he2st.progress import quiet_libraries

if TYPE_CHECKING:
    from he2st.methods.inner_tasks import TaskRunner

ENGINES = ("local", "ray")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
SMALL = (type(None), bool, int, float, str)  # arguments sent with each Ray task even when shared


def threads_per_worker(workers: int) -> int:
    """CPU threads each worker may use, so workers together do not oversubscribe the machine."""
    if workers < 1:
        raise He2stError(f"--workers must be at least 1, got {workers}")
    return max(1, (os.cpu_count() or 1) // workers)


def task_threads(engine: str, workers: int, threads: int | None) -> dict[str, int]:
    """The CPU threads each task of ``engine`` computes with, torch's and the BLAS's: ``threads`` when given,
    else the cores shared among the workers, or in a serial run this process's own pools as they are. Neural
    fits sum in another order, and iterative solvers (ridge's lsqr) stop at another iterate, under other
    counts, so a task computed under one count is not another's."""
    if threads is not None or engine != "serial":
        count = threads or threads_per_worker(workers)
        return {"torch": count, "blas": count}
    import torch
    from threadpoolctl import threadpool_info

    blas = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return {"torch": torch.get_num_threads(), "blas": max(blas, default=1)}


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
              threads: int | None = None, pool: ProcessPoolExecutor | None = None,
              gpus: bool = True) -> list[Any]:
    """Run ``task(*args, threads)`` for every entry of ``arguments`` on ``engine`` with ``workers`` at once
    (``threads``: the CPU threads each may use, by default the cores shared among the workers);
    ``on_done(result)`` as each finishes. Returns the results in input order. ``task`` must be importable.
    ``pool``: a running local pool to use (else one is started and stopped here). ``gpus``: on Ray, each
    task asks for a GPU where the cluster has them. An argument object shared by several tasks (the spots
    of a fit's inner folds) is put in Ray's object store once."""
    threads = threads or threads_per_worker(workers)
    results: dict[int, Any] = {}

    def record(i: int, result: Any) -> None:
        results[i] = result
        if on_done is not None:
            on_done(result)

    if engine == "local":
        own = pool is None
        pool = pool or local_pool(workers)
        futures = {pool.submit(task, *args, threads): i for i, args in enumerate(arguments)}
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:  # a task's exception or an interrupt: tasks not started are dropped
            for future in futures:
                future.cancel()
            if own:
                pool.shutdown(cancel_futures=True)
            raise
        if own:
            pool.shutdown()
        return [results[i] for i in range(len(arguments))]
    if engine != "ray":
        raise He2stError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    ray = _ray()
    started = _ray_init(address, workers, threads)
    pending: dict[Any, int] = {}
    try:
        gpu = 1 if gpus and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=threads, num_gpus=gpu)(task)
        uses = Counter(id(a) for args in arguments for a in args)
        stored: dict[int, Any] = {}

        def stored_once(a: Any) -> Any:
            if uses[id(a)] > 1 and id(a) not in stored and not isinstance(a, SMALL):
                stored[id(a)] = ray.put(a)
            return stored.get(id(a), a)

        for i, args in enumerate(arguments):
            pending[remote.remote(*map(stored_once, args), threads)] = i
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            record(pending.pop(done[0]), ray.get(done[0]))
    finally:
        for ref in pending:  # an error or an interrupt: the tasks not finished are cancelled
            ray.cancel(ref)
        if started:
            ray.shutdown()
    return [results[i] for i in range(len(arguments))]


def local_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh processes (spawned: a forked copy of a process whose torch and OpenMP
    threads have run can hang), each as quiet as the command's own (:func:`he2st.progress.quiet_libraries`)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=quiet_libraries)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise He2stError("--engine ray needs ray: pip install 'he2st[ray]'") from exc
    return ray


def _ray_init(address: str | None, workers: int, threads: int) -> bool:
    """Connect to Ray (the cluster at ``address``, else a local instance of ``workers`` x ``threads`` CPUs) unless
    this process already is (a task on the cluster, or a caller's connection); whether it connected here."""
    ray = _ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, num_cpus=None if address else workers * threads, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    return True


def with_threads(task: Callable[..., Any], *arguments: Any) -> Any:
    """``task(*args)`` in a process held to ``threads`` CPU threads (the last of ``arguments``)."""
    *args, threads = arguments
    limit_threads(threads)
    return task(*args)


@contextmanager
def task_runner(engine: str, workers: int, address: str | None = None, threads: int | None = None,
                gpus: bool = True) -> Iterator[TaskRunner | None]:
    """A runner for :func:`he2st.methods.inner_tasks.inner_tasks` on ``engine`` ('serial': None, the fits
    run in this process). A local engine keeps one pool of ``workers`` processes for every map made within
    the block, so its processes start (and import torch) once; Ray is connected to once. ``gpus`` False:
    Ray tasks ask for no GPU (tasks nested in a task that holds one would otherwise wait for it forever)."""
    if engine == "serial":
        yield None
        return
    if engine not in ENGINES:
        raise He2stError(f"unknown engine {engine!r}: choose serial, {' or '.join(ENGINES)}")
    pool = local_pool(workers) if engine == "local" else None
    connected = engine == "ray" and _ray_init(address, workers, threads or threads_per_worker(workers))

    def runner(task: Callable[..., Any], arguments: list[tuple]) -> list[Any]:
        results = run_tasks(with_threads, [(task, *args) for args in arguments], engine, workers, address,
                            threads=threads, pool=pool, gpus=gpus)
        # Ray hands back arrays read-only (views of its shared memory); a fitted model must own its arrays
        return results if pool is not None else copy.deepcopy(results)

    try:
        yield runner
    except BaseException:  # an error or an interrupt: fits not started are dropped, running ones not awaited
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        if pool is not None:
            pool.shutdown()
    finally:
        if connected:
            _ray().shutdown()
