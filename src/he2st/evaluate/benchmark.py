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

import torch

from he2st import __version__
from he2st.config import BenchmarkConfig, dump_config
from he2st.data.splits import check_fold
from he2st.errors import He2stError
from he2st.evaluate.protocol import FoldAudit, FoldRun, build_fold_data, run_fold
from he2st.evaluate.tables import FoldResult, average_results, summarise, to_markdown, write_results
from he2st.methods.registry import method_class
from he2st.io import sha256_file, write_text_atomic
from he2st.workspace import Workspace

# improved-BLEEP components switched off one at a time (name -> option overrides)
ABLATIONS: dict[str, dict] = {
    # negatives from the batch only; with batch negatives the soft targets would come from a few
    # spots, so this row uses plain InfoNCE (identity targets) -- one component, "whole-set negatives"
    "bleep-batch_negatives": {"negatives": "batch", "soft_targets": False},
    "bleep-single_model": {"ensemble": 1},
    "bleep-bleep_loss": {"loss": "bleep_soft", "temperature": 1.0, "learn_temperature": False},
    "bleep-projection_expr": {"expression_encoder": "projection"},
    "bleep-average_retrieval": {"weighting": "average"},
}


@dataclass
class BenchmarkOutcome:
    results: list[FoldResult]
    audits: dict[tuple[str, str], FoldAudit]
    runs: dict[tuple[str, str], FoldRun]
    paths: dict[str, Path]
    table: str


def provenance(config: BenchmarkConfig, ws: Workspace, command: str | None) -> dict:
    sample_ids = sorted({s for f in ws.load_folds(config.folds.scheme)[0] for s in f.train + f.test})
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


def run_benchmark(
    config: BenchmarkConfig, command: str | None = None, log: Callable[[str], None] | None = None
) -> BenchmarkOutcome:
    ws = Workspace(config.work_dir)
    folds, patients = ws.load_folds(config.folds.scheme)
    variants: list[tuple[str, str, dict]] = [(m, m, {}) for m in config.methods]
    if config.ablation:
        variants += [(label, "bleep", opts) for label, opts in ABLATIONS.items()]
    results, audits, runs = [], {}, {}
    for fold in folds:
        check_fold(fold, patients)
        if fold.leaky and not config.folds.allow_shared_patients:
            raise He2stError(
                f"fold {fold.name} shares patient(s) {fold.shared_patients} between training and test; set "
                "folds.allow_shared_patients: true to run it anyway (results are labelled LEAKY)",
                ws.folds_path(config.folds.scheme))
        data = build_fold_data(ws, fold, config, patients)
        for label, method, opts in variants:
            n_seeds = config.seeds if method_class(method).stochastic else 1
            seed_runs = [run_fold(method, data, config, opts | {"seed": config.seed + s}) for s in range(n_seeds)]
            run = seed_runs[0]
            run.result = average_results([r.result for r in seed_runs])
            run.seconds = sum(r.seconds for r in seed_runs)
            run.result.method = label
            results.append(run.result)
            audits[(label, fold.name)] = run.audit
            runs[(label, fold.name)] = run
            if log is not None:
                scores = run.result.set_scores()
                log(f"{fold.name:<12} {label:<24} all {scores['all']['pearson_mean']:.3f}  "
                    f"heg{config.n_top} {scores[f'heg{config.n_top}']['pearson_mean']:.3f}  "
                    f"hvg{config.n_top} {scores[f'hvg{config.n_top}']['pearson_mean']:.3f}  ({run.seconds:.1f} s)")
    out_dir = ws.run_dir(config.name)
    prov = provenance(config, ws, command)
    prov["audit"] = {f"{m}/{f}": a.__dict__ for (m, f), a in audits.items()}
    paths = write_results(out_dir, results, prov)
    write_text_atomic(out_dir / "config.yaml", dump_config(config))
    n = config.n_top
    table = to_markdown(summarise(results), sets=("all", f"heg{n}", f"hvg{n}", f"heg{n}_testselected"))
    return BenchmarkOutcome(results, audits, runs, paths, table)
