"""One benchmark task -- a row label (a method with its options) on one fold, all its seeds -- run in this
process or in a worker of a process pool, and the outcome it returns.

A task builds its fold's data itself (the panel, spots and gene sets of :func:`build_fold_data`, and the
fold's TLS truth and probe) and keeps the last fold built in its process, so tasks of one fold that follow
each other in a process share them. Serial and pooled runs go through this same code, so they fit every
method on identical inputs. The outcome holds no fitted model: TLS, the one score computed from the fitted
methods after the fold, is scored here and carried in the outcome.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from he2st.data.splits import Fold
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.scoring import average_results
from he2st.evaluate.tls import TlsModel
from he2st.evaluate.tls_benchmark import TlsFold, TlsReport
from he2st.methods import method_class
from he2st.methods.inner_tasks import inner_tasks
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.engines import limit_threads, task_runner
from he2st.workflows.protocol import FoldData, FoldRun, build_fold_data, run_fold
from he2st.workflows.task_store import model_digest


@dataclass(frozen=True)
class BenchmarkTask:
    """What a worker needs to run one row on one fold (``tls_model`` None: no TLS scores)."""

    config: BenchmarkConfig
    fold: Fold
    patients: dict[str, str]
    label: str
    method: str
    options: dict[str, Any]
    tls_model: TlsModel | None = None


@dataclass
class TlsOfFold:
    """The fold's TLS part, the same for every row of the fold: the probe's scores, what the fold used, and
    why it could not be built ('' when it was)."""

    probe: dict[str, float] | None = None
    info: dict[str, Any] | None = None
    failure: str = ""


@dataclass
class TaskOutcome:
    """A finished task: the seeds' averaged run (no fitted model), or why the method could not run here;
    its TLS scores (or why not) and the fold's TLS part; the process that ran it and its wall time."""

    fold: str
    label: str
    run: FoldRun | None
    failure: str = ""
    tls_scores: dict[str, float] | None = None
    tls_failure: str = ""
    tls_fold: TlsOfFold = field(default_factory=TlsOfFold)
    pid: int = 0
    seconds: float = 0.0


_last_fold: dict[str, tuple[FoldData, TlsFold | None, TlsOfFold]] = {}  # this process's last fold, by its inputs


def forget_folds() -> None:
    """Let the last fold's data go (the serial engine, once every task has run)."""
    _last_fold.clear()


def _fold_inputs(task: BenchmarkTask) -> tuple[FoldData, TlsFold | None, TlsOfFold]:
    """The fold's data and TLS part, built once per fold in this process."""
    digest = (task.config.model_dump_json() + task.fold.model_dump_json() + repr(sorted(task.patients.items()))
              + str(model_digest(task.tls_model)))
    if digest not in _last_fold:
        _last_fold.clear()
        ws = Workspace(task.config.work_dir)
        data = build_fold_data(ws, task.fold, task.config, task.patients)
        tls_fold, summary = None, TlsOfFold()
        if task.tls_model is not None:
            report = TlsReport(task.config.tls_model, task.tls_model)
            samples = {s: ws.load_sample(s) for s in [*task.fold.train, *task.fold.test]}
            tls_fold = report.fold(task.fold.name, samples, data.train, data.test_inputs, task.patients)
            summary = TlsOfFold(report.probe.get(task.fold.name), report.folds.get(task.fold.name),
                                report.failures.get(task.fold.name, ""))
        _last_fold[digest] = (data, tls_fold, summary)
    return _last_fold[digest]


def run_task(task: BenchmarkTask, threads: int | None = None) -> TaskOutcome:
    """Fit and score ``task``'s row on its fold with every seed (``threads``: the CPU threads this process may
    use, set in a pool's worker; None leaves them). A method that cannot run here (:class:`He2stError`) is an
    outcome with its reason; other exceptions are raised."""
    if threads is not None:
        limit_threads(threads)
    start = time.perf_counter()
    data, tls_fold, tls_summary = _fold_inputs(task)
    fold, label, config = task.fold.name, task.label, task.config
    n_seeds = config.seeds if method_class(task.method).stochastic else 1
    first_seed = (config.options_for(task.method) | task.options)["seed"]  # method_options.<m>.seed, else seed
    outcome = TaskOutcome(fold, label, None, tls_fold=tls_summary, pid=os.getpid())
    # on Ray, a task's own independent fits (the ensemble's inner folds) are tasks of the cluster too; a
    # local pool's workers run theirs themselves (a pool inside a pool would oversubscribe the cores)
    nested = (task_runner("ray", config.workers, config.address, threads, gpus=False) if config.engine == "ray"
              else nullcontext())
    try:
        with nested as runner, inner_tasks(runner):
            seed_runs = [run_fold(task.method, data, config, task.options | {"seed": first_seed + s})
                         for s in range(n_seeds)]
    except He2stError as exc:  # one method that cannot run here does not stop the others
        outcome.failure = str(exc)
        outcome.seconds = time.perf_counter() - start
        return outcome
    if tls_fold is not None:
        scorer = TlsReport(config.tls_model, task.tls_model)
        scorer.score(label, fold, [r.method for r in seed_runs], tls_fold, data.train, data.test_inputs)
        outcome.tls_scores = scorer.scores.get((label, fold))
        outcome.tls_failure = scorer.failures.get(f"{label}/{fold}", "")
    for r in seed_runs:
        r.method = None  # fitted models are not kept across folds
    run = seed_runs[0]
    run.result = average_results([r.result for r in seed_runs])
    run.seconds = sum(r.seconds for r in seed_runs)
    run.result.method = label
    outcome.run = run
    outcome.seconds = time.perf_counter() - start
    return outcome
