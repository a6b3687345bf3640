"""Many slides, one command: ``he2st predict --manifest slides.csv`` (or several ``--slide``).

One task per slide on an existing engine -- a local process pool (``engine="local"``) or Ray
(``engine="ray"``: a local Ray instance by default, a cluster with ``address``; a GPU per task when the
cluster has them). Every slide is predicted by the same code as a single ``he2st predict`` (so each is
resumable and its output identical to predicting it alone); a slide that fails is recorded with its
error while the others finish, and ``<out>/index.csv`` lists every slide's status and output.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from he2st.errors import He2stError
from he2st.io import write_text_atomic
from he2st.predict import PredictConfig

MANIFEST_COLUMNS = ("slide", "mpp", "spots_from", "out")


@dataclass
class SlideOutcome:
    slide: str
    status: str  # "done" or "failed"
    output: str
    error: str
    seconds: float


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with a ``slide`` column and optional ``mpp``, ``spots_from`` and ``out`` columns;
    relative paths are relative to the manifest's folder."""
    if not path.is_file():
        raise He2stError("manifest not found", path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise He2stError(f"cannot parse the manifest ({exc})", path) from exc
    unknown = set(table.columns) - set(MANIFEST_COLUMNS)
    if "slide" not in table.columns or unknown:
        raise He2stError(f"manifest columns must be slide[, mpp, spots_from, out]; got {list(table.columns)}", path)
    if table.empty:
        raise He2stError("manifest lists no slide", path)
    rows = []
    for row in table.to_dict("records"):
        for key in ("slide", "spots_from", "out"):
            if row.get(key):
                row[key] = str((path.parent / row[key]) if not Path(row[key]).is_absolute() else row[key])
        rows.append({k: v for k, v in row.items() if v != ""})
    return rows


def slide_configs(base: PredictConfig, rows: list[dict[str, str]]) -> list[PredictConfig]:
    """One prediction config per row: the command's settings with the row's slide, mpp, spots and output."""
    configs = []
    for row in rows:
        update = {"slide": Path(row["slide"]), "library_id": None}
        if "mpp" in row:
            update["mpp"] = float(row["mpp"])
        if "spots_from" in row:
            update["spots_from"] = Path(row["spots_from"])
        if "out" in row:
            update["out"] = Path(row["out"])
        configs.append(base.model_copy(update=update))
    return configs


def predict_one(model: str, config: PredictConfig, threads: int) -> SlideOutcome:
    """Predict one slide (in a worker): its outcome, never an exception."""
    import torch

    from he2st.methods import load_method
    from he2st.predict import run_prediction

    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        path = run_prediction(config, load_method(model))
        return SlideOutcome(str(config.slide), "done", str(path), "", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a failing slide is recorded, the others go on
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return SlideOutcome(str(config.slide), "failed", "", message, time.perf_counter() - start)


def predict_many(model: str | Path, configs: list[PredictConfig], out: Path, engine: str = "local",
                 workers: int = 2, address: str | None = None,
                 on_done: Callable[[SlideOutcome], None] | None = None) -> list[SlideOutcome]:
    """Predict every slide with ``engine``; write ``<out>/index.csv``; return the outcomes in input order."""
    if workers < 1:
        raise He2stError(f"--workers must be at least 1, got {workers}")
    model, threads = str(model), max(1, (os.cpu_count() or 1) // workers)
    outcomes: dict[int, SlideOutcome] = {}

    def record(i: int, outcome: SlideOutcome) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            on_done(outcome)

    if engine == "local":
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(predict_one, model, cfg, threads): i for i, cfg in enumerate(configs)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    elif engine == "ray":
        _with_ray(model, configs, workers, threads, address, record)
    else:
        raise He2stError(f"unknown engine {engine!r}: choose local or ray")
    ordered = [outcomes[i] for i in range(len(configs))]
    write_index(out / "index.csv", ordered)
    return ordered


def _with_ray(model: str, configs: list[PredictConfig], workers: int, threads: int, address: str | None,
              record: Callable[[int, SlideOutcome], None]) -> None:
    try:
        import ray
    except ImportError as exc:
        raise He2stError("--engine ray needs ray: pip install 'he2st[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=threads if not address else 1, num_gpus=gpus)(predict_one)
        pending = {task.remote(model, cfg, threads): i for i, cfg in enumerate(configs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            record(pending.pop(done[0]), ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def write_index(path: Path, outcomes: list[SlideOutcome]) -> Path:
    """``index.csv``: each slide's status, output (or error) and seconds, in input order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide", "status", "output", "error", "seconds"])
    writer.writerows([o.slide, o.status, o.output, o.error, f"{o.seconds:.1f}"] for o in outcomes)
    write_text_atomic(path, text.getvalue())
    return path
