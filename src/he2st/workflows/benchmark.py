"""``he2st benchmark``: several methods over the same patient-level folds, one results folder.

Fold data (panel, spots, gene sets) are built once per fold and shared, so every method sees
identical inputs. Results carry their provenance: the command, the resolved config, package
versions and checksums of the prepared samples and embeddings they were computed from.
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
from he2st.evaluate.scoring import FoldResult, average_results, summarise, summarise_extra
from he2st.evaluate.tables import extra_markdown, localisation_markdown, reliability_markdown, to_markdown
from he2st.evaluate.tls_benchmark import TlsReport
from he2st.io import atomic_path, check_output, sha256_file, write_text_atomic
from he2st.methods import method_class
from he2st.version import __version__
from he2st.workflows.config import BenchmarkConfig, dump_config
from he2st.workflows.learning_curve import CURVE_FILE, curve_markdown, run_learning_curve
from he2st.workflows.protocol import FoldAudit, FoldRun, build_fold_data, run_fold
from he2st.workflows.tls import read_model


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
        offer = (" ; to hold out one sample at a time instead, run `he2st prepare --set folds.scheme=loso` and "
                 "`he2st benchmark --folds loso`" if len(ids) >= 2 else "")
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


def provenance(config: BenchmarkConfig, ws: Workspace, command: str | None) -> dict:
    sample_ids = sorted({s for f in benchmark_folds(config, ws)[0] for s in f.train + f.test})
    checksums = {f"samples/{s}.h5ad": sha256_file(ws.sample_path(s)) for s in sample_ids}
    checksums |= {
        str(ws.embedding_path(config.embed, s, config.patch).relative_to(ws.root)):
        sha256_file(ws.embedding_path(config.embed, s, config.patch)) for s in sample_ids
    }
    return {
        "command": command or " ".join(["he2st", *sys.argv[1:]]),
        "config": config.model_dump(mode="json"),
        "he2st_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "data_checksums_sha256": checksums,
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
    """The run's folder ``<work>/runs/<name>``, once every file the run writes there is known to be writable:
    absent or he2st's own (or ``--overwrite``); else one line naming the file."""
    ws = Workspace(config.work_dir)
    out_dir = ws.run_dir(config.name)
    check_results_folder(out_dir, ("config.yaml", CURVE_FILE, "learning_curve.png"))
    tested = sorted({s for fold in benchmark_folds(config, ws)[0] for s in fold.test})
    for label, _, _ in benchmark_variants(config):
        for sid in tested:
            check_output(out_dir / "predictions" / label / f"{sid}.h5ad")
    return out_dir


def run_benchmark(
    config: BenchmarkConfig, command: str | None = None, log: Callable[[str], None] | None = None
) -> BenchmarkOutcome:
    ws = Workspace(config.work_dir)
    folds, patients = benchmark_folds(config, ws)
    for sid in sorted({s for fold in folds for s in [*fold.train, *fold.test]}):
        warn_if_too_coarse(ws.load_sample(sid), config.patch)
    variants = benchmark_variants(config)
    out_dir = check_outputs(config)  # before any work: files he2st did not write are refused
    results, audits, runs = [], {}, {}
    failures: dict[str, str] = {}
    tls = tls_report(config)
    for fold in folds:
        check_fold(fold, patients)
        if fold.leaky and not config.folds.allow_shared_patients:
            raise He2stError(
                f"fold {fold.name} shares patient(s) {fold.shared_patients} between training and test; set "
                "folds.allow_shared_patients: true to run it anyway (results are labelled LEAKY)",
                ws.folds_path(config.folds.scheme))
        data = build_fold_data(ws, fold, config, patients)
        tls_fold = None if tls is None or tls.model is None else tls.fold(
            fold.name, {s: ws.load_sample(s) for s in [*fold.train, *fold.test]}, data.train, data.test_inputs,
            patients)
        for label, method, opts in variants:
            n_seeds = config.seeds if method_class(method).stochastic else 1
            first_seed = (config.options_for(method) | opts)["seed"]  # method_options.<method>.seed, else seed
            try:
                seed_runs = [run_fold(method, data, config, opts | {"seed": first_seed + s}) for s in range(n_seeds)]
            except He2stError as exc:  # one method that cannot run here does not stop the others
                failures[f"{label}/{fold.name}"] = str(exc)
                if log is not None:
                    log(f"{fold.name:<12} {label:<24} skipped: {exc}")
                continue
            if tls_fold is not None:
                tls.score(label, fold.name, [r.method for r in seed_runs], tls_fold, data.train, data.test_inputs)
            for r in seed_runs:
                r.method = None  # fitted models are not kept across folds
            run = seed_runs[0]
            run.result = average_results([r.result for r in seed_runs])
            run.seconds = sum(r.seconds for r in seed_runs)
            run.result.method = label
            results.append(run.result)
            audits[(label, fold.name)] = run.audit
            runs[(label, fold.name)] = run
            write_predictions(ws, ws.run_dir(config.name) / "predictions" / label, run, fold.name)
            if log is not None:
                scores = run.result.set_scores()
                log(f"{fold.name:<12} {label:<24} all {scores['all']['pearson_mean']:.3f}  "
                    f"heg{config.n_top} {scores[f'heg{config.n_top}']['pearson_mean']:.3f}  "
                    f"hvg{config.n_top} {scores[f'hvg{config.n_top}']['pearson_mean']:.3f}"
                    + (f"  coverage90 {scores['all']['coverage90']:.2f}" if "coverage90" in scores["all"] else "")
                    + f"  ({run.seconds:.1f} s)")
    prov = provenance(config, ws, command)
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
