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
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from he2st.errors import He2stError, He2stWarning
from he2st.io import check_output, inside, name_from_stem, table_path, write_text_atomic
from he2st.predict import PredictConfig
from he2st.progress import quiet_libraries
from he2st.workflows.engines import run_tasks

MANIFEST_COLUMNS = ("slide", "mpp", "spots_from", "out")


@dataclass
class SlideOutcome:
    slide: str
    status: str  # "done" or "failed"
    output: str
    error: str
    seconds: float


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with a ``slide`` column and optional ``mpp``, ``spots_from`` and ``out`` columns (a row
    with ``spots_from`` may leave ``slide`` empty: the sample's image); relative input paths are relative to
    the manifest's folder, ``out`` to the command's output folder."""
    table_path(path, "manifest")
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
        for key in ("slide", "spots_from"):
            if row.get(key):
                row[key] = str((path.parent / row[key]) if not Path(row[key]).is_absolute() else row[key])
        rows.append({k: v for k, v in row.items() if v != ""})
    return rows


def slide_configs(base: PredictConfig, rows: list[dict[str, str]], manifest: Path | None = None) -> list[PredictConfig]:
    """One prediction config per row: the command's settings with the row's slide, mpp, spots and output (a
    folder inside the command's ``out``: a row cannot send its files elsewhere).

    Before any work: a row that repeats an earlier one (same slide, spots, mpp and output) is merged into it
    with a warning; two different rows that would write the same output file are refused in one line (they
    would overwrite each other, or fight over one partial file)."""
    configs: list[PredictConfig] = []
    seen: dict[tuple, str] = {}
    outputs: dict[Path, str] = {}
    for i, row in enumerate(rows):
        named = row.get("slide") or row.get("spots_from")
        where = f"row {i + 2}" if manifest is not None else f"--slide {named}"
        if named is None:
            raise He2stError(f"{where}: neither a slide nor spots_from", manifest)
        update = {"slide": Path(row["slide"]) if row.get("slide") else None, "library_id": None}
        if "mpp" in row:
            try:
                update["mpp"] = float(row["mpp"])
            except ValueError:
                raise He2stError(f"{where}: mpp {row['mpp']!r} is not a number", manifest) from None
            if not (math.isfinite(update["mpp"]) and update["mpp"] > 0):  # model_copy does not validate
                raise He2stError(f"{where}: mpp {row['mpp']!r} is not a positive pixel size", manifest)
        if "spots_from" in row:
            update["spots_from"] = Path(row["spots_from"])
        if "out" in row:
            update["out"] = inside(base.out, base.out / row["out"], f"manifest out of {Path(named).name}:")
        config = base.model_copy(update=update)
        key = (_same(config.slide), _same(config.spots_from), config.mpp, _same(config.out))
        if key in seen:
            warnings.warn(f"{manifest or 'predict'}: {where} repeats {seen[key]} ({named}): predicted once",
                          He2stWarning, stacklevel=2)
            continue
        seen[key] = where
        output = output_of(config)
        if output is not None and output in outputs:
            raise He2stError(f"{outputs[output]} and {where} would both write {output}; give one of them its own "
                             "out column (or rename a slide)", manifest)
        if output is not None:
            outputs[output] = where
        configs.append(config)
    return configs


def _same(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def output_of(config: PredictConfig) -> Path | None:
    """The ``.h5ad`` a row writes (None when it depends on a sample file that cannot be read here: that row
    then fails on its own)."""
    if config.spots_from is None:
        return Path(_same(config.output(name_from_stem(Path(config.slide).stem))))
    try:
        import h5py

        with h5py.File(config.spots_from, "r") as fh:
            value = fh["uns/he2st/sample_id"][()]
        return Path(_same(config.output(value.decode() if isinstance(value, bytes) else str(value))))
    except (OSError, KeyError, He2stError):
        return None


def predict_one(model: str, config: PredictConfig, threads: int) -> SlideOutcome:
    """Predict one slide (in a worker): its outcome, never an exception."""
    import torch

    from he2st.methods import load_method
    from he2st.predict import run_prediction

    torch.set_num_threads(threads)
    quiet_libraries()  # a Ray worker, too, keeps to the command's one error line per slide
    start = time.perf_counter()
    slide = str(config.slide or config.spots_from)  # a manifest row may name only its sample
    try:
        path = run_prediction(config, load_method(model))
        return SlideOutcome(slide, "done", str(path), "", time.perf_counter() - start)
    except He2stError as exc:  # a failing slide is recorded, the others go on
        return SlideOutcome(slide, "failed", "", " ".join(str(exc).split()), time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - not bad input: named with its type
        text = str(exc).strip()
        message = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        return SlideOutcome(slide, "failed", "", message, time.perf_counter() - start)


def predict_many(model: str | Path, configs: list[PredictConfig], out: Path, engine: str = "local",
                 workers: int = 2, address: str | None = None,
                 on_done: Callable[[SlideOutcome], None] | None = None) -> list[SlideOutcome]:
    """Predict every slide with ``engine``; write ``<out>/index.csv``; return the outcomes in input order."""
    check_output(out / "index.csv")  # before any work
    outcomes = run_tasks(predict_one, [(str(model), cfg) for cfg in configs], engine, workers, address, on_done)
    write_index(out / "index.csv", outcomes)
    return outcomes


def write_index(path: Path, outcomes: list[SlideOutcome]) -> Path:
    """``index.csv``: each slide's status, output (or error) and seconds, in input order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide", "status", "output", "error", "seconds"])
    writer.writerows([o.slide, o.status, o.output, o.error, f"{o.seconds:.1f}"] for o in outcomes)
    write_text_atomic(path, text.getvalue())
    return path
