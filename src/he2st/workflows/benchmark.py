"""``he2st benchmark``: several methods over the same patient-level folds, one results folder.

Each (fold, row) is one task (:mod:`he2st.workflows.benchmark_tasks`), run one by one or in a pool of
processes; fold data (panel, spots, gene sets) are built from the same files by the same code for every
row, so every method sees identical inputs. Finished tasks are stored in the run folder and reused by a
later run whose settings, data and code match (:mod:`he2st.workflows.task_store`). Results carry their
provenance: the command, the resolved config, package versions, checksums of the prepared samples and
embeddings they were computed from, and the process that ran each task.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from he2st.data.patches import warn_if_too_coarse
from he2st.data.splits import Fold, check_fold, inner_folds
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.results import check_results_folder, write_results
from he2st.evaluate.scoring import FoldResult, summarise, summarise_extra
from he2st.evaluate.tables import extra_markdown, localisation_markdown, reliability_markdown, to_markdown
from he2st.evaluate.tls_benchmark import TlsReport
from he2st.io import atomic_path, check_output, sha256_file, write_text_atomic
from he2st.methods import method_class
from he2st.methods.registry import METHODS
from he2st.version import __version__
from he2st.workflows.benchmark_tasks import BenchmarkTask, TaskOutcome, forget_folds, run_task
from he2st.workflows.config import BenchmarkConfig, dump_config
from he2st.workflows.engines import run_tasks
from he2st.workflows.learning_curve import CURVE_FILE, curve_markdown, run_learning_curve
from he2st.workflows.protocol import FoldAudit, FoldRun, check_references
from he2st.workflows.task_store import TaskStore, model_digest, run_settings, task_key, task_settings
from he2st.workflows.tls import read_model
from he2st.workflows.unlabelled import unlabelled_ids


def ablation_variants(methods: list[str], only: list[str] | None = None) -> list[tuple[str, str, dict]]:
    """``(row label, method, options)`` for the ablations of the listed methods, in their order;
    ``only`` keeps rows whose method or label it names."""
    rows = [(f"{m}-{name}", m, opts) for m in methods for name, opts in method_class(m).ablations.items()]
    if only is None:
        return rows
    unknown = set(only) - {label for label, _, _ in rows} - set(methods)
    if unknown:
        raise He2stError(f"ablation_only names no ablation row of the listed methods: {sorted(unknown)}")
    return [row for row in rows if row[0] in only or row[1] in only]


@dataclass
class BenchmarkOutcome:
    results: list[FoldResult]
    audits: dict[tuple[str, str], FoldAudit]
    runs: dict[tuple[str, str], FoldRun]
    paths: dict[str, Path]
    table: str
    tls: TlsReport | None = None
    curve: pd.DataFrame | None = None  # the learning curve's rows, when one was asked for


def write_predictions(ws: Workspace, folder: Path, run: FoldRun, fold: str) -> None:
    """Each held-out sample's predictions as ``<folder>/<sample>.h5ad``: ``X`` on the panel's scale, the
    sample's spot coordinates, per-spot uncertainty in ``obs``, extras (cell-type proportions) in ``obsm``,
    the fold and the model card in ``uns["he2st"]`` -- for inspection, ensembling and downstream analyses."""
    for sid, pred in run.predictions.items():
        sample = ws.load_sample(sid)
        obs = pd.DataFrame(index=pd.Index(sample.adata.obs_names.astype(str), name="spot"))
        for key, values in pred.uncertainty.items():
            obs[key] = np.asarray(values, np.float32)
        var = pd.DataFrame(index=pd.Index(pred.genes, name="gene"))
        if run.reliability is not None:
            for key, values in run.reliability.gene_columns(pred.genes).items():
                var[key] = values
        adata = ad.AnnData(X=np.asarray(pred.expression, np.float32), obs=obs, var=var,
                           layers={k: np.asarray(v, np.float32) for k, v in pred.layers.items()})
        adata.obsm["spatial"] = sample.spatial
        for key, values in pred.extras.items():
            adata.obsm[key] = np.asarray(values, np.float32)
        adata.uns["he2st"] = {"fold": fold, "sample": sid, "method": run.card.method,
                              "target_transform": run.card.target_scale, "card": run.card.model_dump_json()}
        with atomic_path(folder / f"{sid}.h5ad", suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)


def missing_folds(ws: Workspace, scheme: str) -> He2stError:
    """Why a work folder has no ``scheme`` folds, in one line that names the real cause: no samples, samples
    of a single patient (leave-one-patient-out needs two; leave-one-sample-out is offered when there are two
    samples), a single sample, or folds that were prepared for another scheme."""
    ids = ws.sample_ids()
    if not ids:
        return He2stError(f"no prepared samples in {ws.root}: run `he2st prepare` first, or pass --dataset her2st")
    patients = {sid: ws.load_sample(sid).patient_id for sid in ids}
    names = ", ".join(ids)
    if scheme == "lopo" and len(set(patients.values())) < 2:
        # one patient: every other section is a sibling, so leave-one-sample-out trains only where they are allowed
        offer = (" ; to hold out one sample at a time instead (folds labelled LEAKY: the training sections are the "
                 "same patient's), run `he2st prepare --set folds.scheme=loso --set folds.allow_shared_patients=true` "
                 "and `he2st benchmark --folds loso --set folds.allow_shared_patients=true`" if len(ids) >= 2 else "")
        return He2stError(f"all prepared samples ({names}) are of one patient ({patients[ids[0]]}): "
                          f"leave-one-patient-out folds need samples of at least 2 patients{offer}".replace(" ;", ";"),
                          ws.root)
    if len(ids) < 2:
        return He2stError(f"only one prepared sample ({names}): {scheme} folds need at least 2 samples", ws.root)
    return He2stError(f"no {scheme} folds prepared here: run `he2st prepare --set folds.scheme={scheme}` first",
                      ws.root)


def benchmark_folds(config: BenchmarkConfig, ws: Workspace) -> tuple[list[Fold], dict[str, str]]:
    """The prepared folds, or with ``inner_of`` the folds nested inside that one's training samples."""
    folds, patients = ws.load_folds(config.folds.scheme)
    if config.inner_of:
        folds = inner_folds(folds, patients, config.inner_of, config.folds.scheme, config.folds.allow_shared_patients)
    return folds, patients


def fold_inputs(config: BenchmarkConfig, ws: Workspace, fold: Fold) -> list[str]:
    """The samples whose files a fold's tasks read: its training and held-out samples, and the ``unlabelled``
    ones whose images join the fit."""
    return list(dict.fromkeys([*fold.train, *fold.test, *unlabelled_ids(config.unlabelled, ws, fold.test)]))


def input_checksums(config: BenchmarkConfig, ws: Workspace, sample_ids: list[str],
                    known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file the benchmark reads for ``sample_ids``, by path in the work folder: each prepared
    sample, its embeddings and those of the views a method may read (when made), and its patches when a
    method trains on them. ``known`` (path -> sha256) is filled and reused, so each file is read once per run."""
    known = {} if known is None else known
    found = {}
    views = config.needs_views()
    for sid in sample_ids:
        paths = [ws.sample_path(sid), ws.embedding_path(config.embed, sid, config.patch)]
        paths += [p for p in (ws.view_path(config.embed, sid, config.patch, v) for v in views) if p.exists()]
        paths += [ws.patch_path(sid, config.patch)] if config.needs_patches() else []
        for path in paths:
            name = str(path.relative_to(ws.root))
            if name not in known:
                known[name] = sha256_file(path)
            found[name] = known[name]
    return found


def provenance(config: BenchmarkConfig, ws: Workspace, command: str | None,
               known: dict[str, str] | None = None) -> dict:
    sample_ids = sorted({s for f in benchmark_folds(config, ws)[0] for s in fold_inputs(config, ws, f)})
    return {
        "command": command or " ".join(["he2st", *sys.argv[1:]]),
        "config": config.model_dump(mode="json"),
        "he2st_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "data_checksums_sha256": input_checksums(config, ws, sample_ids, known),
    }


def tls_report(config: BenchmarkConfig) -> TlsReport | None:
    """The run's TLS report (None: TLS off); a model that cannot be read skips TLS, with the reason."""
    if not config.tls:
        return None
    try:
        return TlsReport(config.tls_model, read_model(config.tls_model))
    except He2stError as exc:
        return TlsReport(config.tls_model, skipped=str(exc))


def benchmark_variants(config: BenchmarkConfig) -> list[tuple[str, str, dict]]:
    """``(row label, method, options)`` of every row the run fits: the methods, then their ablations."""
    variants: list[tuple[str, str, dict]] = [(m, m, {}) for m in config.methods]
    if config.ablation:
        variants += ablation_variants(config.methods, config.ablation_only)
    return variants


def check_outputs(config: BenchmarkConfig) -> Path:
    """The run's folder ``<work>/runs/<name>``, once every file the run writes there (results, predictions,
    stored tasks) is known to be writable: absent or he2st's own (or ``--overwrite``); else one line naming
    the file."""
    ws = Workspace(config.work_dir)
    out_dir = ws.run_dir(config.name)
    check_results_folder(out_dir, ("config.yaml", CURVE_FILE, "learning_curve.png"))
    folds = benchmark_folds(config, ws)[0]
    tested = sorted({s for fold in folds for s in fold.test})
    store = TaskStore(out_dir)
    for label, _, _ in benchmark_variants(config):
        for sid in tested:
            check_output(out_dir / "predictions" / label / f"{sid}.h5ad")
        for fold in folds:
            store.check(fold.name, label)
    return out_dir


def _check_folds(config: BenchmarkConfig, ws: Workspace, folds: list[Fold], patients: dict[str, str],
                 recorded: dict[str, str]) -> None:
    """Every fold holds out whole patients, unless shared patients were allowed (then labelled LEAKY), by the
    patients the sample files record (``recorded``): a folds file written before the samples were prepared
    again with other patients would otherwise put one patient on both sides without a word."""
    for sid, now in recorded.items():
        if patients[sid] != now:
            raise He2stError(f"the {config.folds.scheme} folds give sample {sid} patient {patients[sid]!r}, its sample "
                             f"file {now!r}: run `he2st prepare --set folds.scheme={config.folds.scheme}` again",
                             ws.folds_path(config.folds.scheme))
    check_references(config, folds)
    for fold in folds:
        check_fold(fold, patients)
        if fold.leaky and not config.folds.allow_shared_patients:
            raise He2stError(
                f"fold {fold.name} shares patient(s) {fold.shared_patients} between training and test; set "
                "folds.allow_shared_patients: true to run it anyway (results are labelled LEAKY)",
                ws.folds_path(config.folds.scheme))


def _score_line(config: BenchmarkConfig, run: FoldRun) -> str:
    scores = run.result.set_scores()
    n = config.n_top
    return (f"all {scores['all']['pearson_mean']:.3f}  heg{n} {scores[f'heg{n}']['pearson_mean']:.3f}  "
            f"hvg{n} {scores[f'hvg{n}']['pearson_mean']:.3f}"
            + (f"  coverage90 {scores['all']['coverage90']:.2f}" if "coverage90" in scores["all"] else ""))


def longest_first(tasks: list[BenchmarkTask], n_spots: dict[str, int]) -> list[BenchmarkTask]:
    """``tasks`` ordered so that a pool's workers run out of work together (the longest-processing-time-first
    rule) while a fold's tasks stay together (each worker keeps the data of the last fold it built): folds
    by decreasing expected fitting time, each fold's tasks longest first. A task's expected time is its
    method's listed cost per 1,000 spots times the fold's training spots (``n_spots``: sample id -> spots)
    and its seeds; a method without a listed cost (the ensemble, which fits several) counts as longer than
    any listed one. Ties keep their order."""
    def expected(task: BenchmarkTask) -> tuple[int, float]:
        cost = METHODS[task.method].cost
        seeds = task.config.seeds if method_class(task.method).stochastic else 1
        return int(cost == 0), (cost or 1.0) * sum(n_spots[s] for s in task.fold.train) * seeds

    folds: dict[str, list[BenchmarkTask]] = {}
    for task in tasks:
        folds.setdefault(task.fold.name, []).append(task)

    def total(fold: list[BenchmarkTask]) -> tuple[int, float]:
        keys = [expected(task) for task in fold]
        return sum(k[0] for k in keys), sum(k[1] for k in keys)

    return [task for fold in sorted(folds.values(), key=total, reverse=True)
            for task in sorted(fold, key=expected, reverse=True)]


def _run_tasks(config: BenchmarkConfig, tasks: list[BenchmarkTask], on_done: Callable[[TaskOutcome], None],
               n_spots: dict[str, int]) -> None:
    """Run ``tasks`` on the configured engine (a pool's longest first), ``on_done`` in this process as each ends."""
    if not tasks:
        return
    if config.engine == "serial":
        try:
            for task in tasks:
                on_done(run_task(task, config.task_threads))
        finally:
            forget_folds()
        return
    run_tasks(run_task, [(task,) for task in longest_first(tasks, n_spots)], config.engine, config.workers,
              config.address, on_done, config.task_threads)


def _gather_tls(tls: TlsReport | None, outcomes: dict[tuple[str, str], TaskOutcome], folds: list[Fold],
                labels: list[str]) -> None:
    """The tasks' TLS scores into the run's report, fold by fold and row by row (the order of a serial run).
    Every task of a fold carries the fold's TLS part; the first one's is taken."""
    if tls is None or tls.model is None:
        return
    for fold in folds:
        mine = [(label, outcomes[(fold.name, label)]) for label in labels]
        part = mine[0][1].tls_fold
        if part.failure:
            tls.failures[fold.name] = part.failure
            continue
        tls.probe[fold.name], tls.folds[fold.name] = part.probe, part.info
        for label, outcome in mine:
            if outcome.run is None:
                continue
            if outcome.tls_scores is not None:
                tls.scores[(label, fold.name)] = outcome.tls_scores
            if outcome.tls_failure:
                tls.failures[f"{label}/{fold.name}"] = outcome.tls_failure


def run_benchmark(
    config: BenchmarkConfig, command: str | None = None, log: Callable[[str], None] | None = None
) -> BenchmarkOutcome:
    """Every row (method, ablation) on every fold, each (fold, row) one task on ``config.engine``; tasks stored
    in the run folder under an unchanged key (:mod:`he2st.workflows.task_store`) are reused, the others run
    and are stored as each ends, so a run stopped part way resumes where it stopped."""
    ws = Workspace(config.work_dir)
    folds, patients = benchmark_folds(config, ws)
    n_spots, recorded = {}, {}
    for sid in sorted({s for fold in folds for s in [*fold.train, *fold.test]}):
        sample = ws.load_sample(sid)
        warn_if_too_coarse(sample, config.patch)
        n_spots[sid], recorded[sid] = sample.n_spots, sample.patient_id
    variants = benchmark_variants(config)
    out_dir = check_outputs(config)  # before any work: files he2st did not write are refused
    _check_folds(config, ws, folds, patients, recorded)
    tls = tls_report(config)
    tls_model = None if tls is None else tls.model
    tls_digest = model_digest(tls_model)
    store, known, shared = TaskStore(out_dir), {}, run_settings(config)
    keys, pending, outcomes, reused = {}, [], {}, set()
    for fold in folds:
        checksums = input_checksums(config, ws, fold_inputs(config, ws, fold), known)
        for label, method, opts in variants:
            keys[(fold.name, label)] = task_key(task_settings(shared, config, label, method, opts), fold, patients,
                                                checksums, tls_digest)
            stored = store.load(fold.name, label, keys[(fold.name, label)]) if config.resume else None
            if isinstance(stored, TaskOutcome) and stored.run is not None:
                outcomes[(fold.name, label)] = stored
                reused.add((fold.name, label))
            else:
                pending.append(BenchmarkTask(config, fold, patients, label, method, opts, tls_model))

    def finish(outcome: TaskOutcome) -> None:
        """Write a task's predictions, then store it (a stored task's predictions are on disk), and log it."""
        where = (outcome.fold, outcome.label)
        outcomes[where] = outcome
        if outcome.run is not None:
            write_predictions(ws, out_dir / "predictions" / outcome.label, outcome.run, outcome.fold)
            if where not in reused:
                store.save(outcome.fold, outcome.label, keys[where], outcome)
        if log is None:
            return
        head = f"{outcome.fold:<12} {outcome.label:<24} "
        if outcome.run is None:
            log(head + f"skipped: {outcome.failure}")
        elif where in reused:
            log(head + _score_line(config, outcome.run) + "  (reused)")
        else:
            log(head + _score_line(config, outcome.run) + f"  ({outcome.run.seconds:.1f} s)")

    for where in [w for w in keys if w in reused]:
        finish(outcomes[where])
    _run_tasks(config, pending, finish, n_spots)
    results, audits, runs, failures, tasks = [], {}, {}, {}, {}
    for fold in folds:
        for label, _, _ in variants:
            outcome = outcomes[(fold.name, label)]
            tasks[f"{label}/{fold.name}"] = {"pid": outcome.pid, "seconds": outcome.seconds,
                                             "reused": (fold.name, label) in reused, "key": keys[(fold.name, label)]}
            if outcome.run is None:
                failures[f"{label}/{fold.name}"] = outcome.failure
                continue
            results.append(outcome.run.result)
            audits[(label, fold.name)] = outcome.run.audit
            runs[(label, fold.name)] = outcome.run
    _gather_tls(tls, outcomes, folds, [label for label, _, _ in variants])
    prov = provenance(config, ws, command, known)
    prov["tasks"] = tasks
    prov["threads"] = shared["threads"]
    prov["audit"] = {f"{m}/{f}": a.__dict__ for (m, f), a in audits.items()}
    prov["failures"] = failures
    if not results:
        raise He2stError(f"no method could run on any fold: {failures}")
    curve = run_learning_curve(config, ws, folds, patients, log, {(r.method, str(r.fold)): r for r in results})
    paths = write_results(out_dir, results, prov, tls)
    if not curve.empty:
        paths["learning_curve"] = out_dir / CURVE_FILE
        write_text_atomic(paths["learning_curve"], curve.to_csv(index=False))
    write_text_atomic(out_dir / "config.yaml", dump_config(config))
    n = config.n_top
    table = to_markdown(summarise(results), sets=("all", f"heg{n}", f"hvg{n}", f"heg{n}_testselected"))
    reliability = reliability_markdown(summarise(results))
    if reliability:
        table += "\nReliability on the held-out samples (gene set all; see results.md):\n" + reliability
    extra = summarise_extra(results)
    if not extra.empty:
        table += "\n" + extra_markdown(extra)
    localisation = localisation_markdown(summarise(results))
    if localisation:
        table += "\nCancer localisation on held-out samples with region labels (see results.md):\n" + localisation
    if not curve.empty:
        table += (f"\nLearning curve (heg{n}, mean over folds; {CURVE_FILE}):\n"
                  + curve_markdown(curve, f"heg{n}"))
    if tls is not None:
        table += (f"\nTLS detection (model {tls.source}): per held-out sample, Pearson r and AUROC for its "
                  "top-decile spots of the TLS score from predicted vs measured expression:\n" + tls.markdown())
    return BenchmarkOutcome(results, audits, runs, paths, table, tls, curve)
