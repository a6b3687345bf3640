"""Limited-sample curves: each method refitted on nested subsets of every fold's training data.

Which method to use when a lab has two sections and which when it has thirty is a question of how each
method's score grows with training data. For every outer fold the training patients are put in one seeded
order and the first ``k`` of them are taken (whole numbers in ``learning_curve``), or the first share of the
training spots in one seeded order (fractions): each subset holds the smaller ones, so a curve moves by data
added, not by a new draw. On a subset of patients everything fitted -- the gene panel, validation, gene sets --
is fitted on those patients, as if the lab had only them; a share of spots keeps the fold's panel and gene
sets (the same patients' genes) and its validation spots among those kept. The held-out samples are the
fold's own, so every point of a curve is scored on the same slides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from he2st.data.splits import Fold
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.scoring import FoldResult
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.protocol import FoldData, build_fold_data, run_fold

CURVE_FILE = "learning_curve.csv"
ALL = math.inf  # the fold's whole training data, the last point of every curve


def amount_label(amount: float) -> str:
    """``2 patients`` for a whole number, ``25% of spots`` for a fraction, ``all`` for the whole."""
    if amount == ALL:
        return "all"
    if amount >= 1:
        return f"{int(amount)} patient{'s' if int(amount) != 1 else ''}"
    return f"{amount:.0%} of spots"


def patient_order(fold: Fold, patients: dict[str, str], seed: int) -> list[str]:
    """The fold's training patients in one seeded order (the first k form each whole-number subset)."""
    ids = sorted({patients[s] for s in fold.train})
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


def subset_data(ws: Workspace, fold: Fold, amount: float, config: BenchmarkConfig, patients: dict[str, str],
                full: FoldData) -> FoldData | None:
    """The fold's data refitted on ``amount`` of its training data (None: as many patients as the fold has, or
    more, which is the ``all`` point)."""
    if amount == ALL:
        return full
    if amount >= 1:
        order = patient_order(fold, patients, config.seed)
        if int(amount) >= len(order):
            return None
        keep = set(order[: int(amount)])
        sub = Fold(name=fold.name, train=[s for s in fold.train if patients[s] in keep], test=fold.test)
        return build_fold_data(ws, sub, config, patients)
    rows = np.random.default_rng(config.seed).permutation(len(full.train))
    mask = np.zeros(len(full.train), bool)
    mask[rows[: max(2, int(np.ceil(amount * len(full.train))))]] = True
    return replace(full, train=full.train.subset(mask), val_mask=full.val_mask[mask])


def run_learning_curve(config: BenchmarkConfig, ws: Workspace, folds: list[Fold], patients: dict[str, str],
                       log: Callable[[str], None] | None = None,
                       done: dict[tuple[str, str], FoldResult] | None = None) -> pd.DataFrame:
    """One row per (fold, method, amount, gene set): the training data used and the fold's mean Pearson.

    The curve's fits skip what does not change the score (reliability estimation, whole-transcriptome and
    TLS scoring) and run one seed; every curve ends at the fold's whole training data (``all``), where the
    benchmark's own fit (``done``, by method and fold) is the point when it ran one seed."""
    if not config.learning_curve:
        return pd.DataFrame()
    lean = config.model_copy(update={"reliability": False, "transcriptome_threshold": None, "tls": False})
    rows = []
    for fold in folds:
        full = build_fold_data(ws, fold, lean, patients)
        for amount in [*sorted(set(config.learning_curve)), ALL]:
            data = subset_data(ws, fold, amount, lean, patients, full)
            if data is None:  # as many patients as the fold trains on, or more: its `all` point says it
                if log is not None:
                    n = len({patients[s] for s in fold.train})
                    log(f"{fold.name:<12} {amount_label(amount)}: the fold trains on {n} patient(s): its `all` point")
                continue
            for method in config.methods:
                result = (done or {}).get((method, fold.name)) if data is full and config.seeds == 1 else None
                try:
                    result = result or run_fold(method, data, lean).result
                except He2stError as exc:
                    if log is not None:
                        log(f"{fold.name:<12} {method:<24} {amount_label(amount)}: skipped: {exc}")
                    continue
                n_patients = len({patients[s] for s in set(data.train.sample_ids.astype(str))})
                for gene_set, scores in result.set_scores().items():
                    rows.append({"fold": fold.name, "method": method, "amount": amount_label(amount),
                                 "amount_value": amount, "n_train_patients": n_patients,
                                 "n_train_spots": len(data.train), "gene_set": gene_set,
                                 "pearson_mean": scores.get("pearson_mean", np.nan)})
                if log is not None:
                    heg = result.set_scores().get(f"heg{config.n_top}", {}).get("pearson_mean", np.nan)
                    log(f"{fold.name:<12} {method:<24} {amount_label(amount)} ({len(data.train)} spots): "
                        f"heg{config.n_top} {heg:.3f}")
    return pd.DataFrame(rows)


def curve_markdown(curve: pd.DataFrame, gene_set: str) -> str:
    """Methods down, training amounts across: mean over folds of the fold scores on ``gene_set``."""
    if curve.empty:
        return ""
    part = curve[curve["gene_set"] == gene_set]
    order = part.drop_duplicates("amount").sort_values("amount_value")["amount"].tolist()  # "all" (inf) last
    table = part.pivot_table(index="method", columns="amount", values="pearson_mean", aggfunc="mean")[order]
    lines = ["| method | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    for method, values in table.iterrows():
        lines.append(f"| `{method}` | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"
