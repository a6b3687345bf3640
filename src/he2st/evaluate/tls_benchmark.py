"""TLS detection scored in the benchmark: the TLS score of a held-out sample from predicted expression,
against the score from its measured counts, and a ridge probe that predicts the score from the image.

Retrieval methods (any method with a reference bank) return whatever genes their bank holds, so the
fold's training spots are put in a second bank that returns the TLS model's genes on the log1p CP10k
scale of each spot's whole library -- the scale on which :func:`~he2st.evaluate.tls.tls_score` reads
predictions as relative abundance, exactly as it reads measured counts. Per held-out sample: Pearson r
between the two scores across its spots, and the AUROC of the predicted score for the spots whose
measured score is in the top decile; a fold's value is the mean over its test samples. The model is
restricted to the genes measured in every sample of the fold, so both scores read the same genes; a fold
whose samples hold less than :data:`~he2st.evaluate.tls.MIN_WEIGHT_COVERAGE` of the model's weight (another
tissue's gene panel, another species) is not scored, and says so.

The floor to beat is a ridge probe from the frozen image features straight to the measured TLS score
(standard scaling, PCA to 256 dimensions as HEST's probe, ridge with its alpha chosen by
cross-validation over the training patients), fitted on the fold's training spots only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from he2st.data.genes import transform_counts
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.evaluate.tables import extra_markdown
from he2st.evaluate.tls import MIN_WEIGHT_COVERAGE, TlsModel, gene_symbols, tls_agreement, tls_score
from he2st.methods import Method

__all__ = ["PROBE", "TlsFold", "TlsReport", "build_tls_fold", "method_tls_scores"]

PROBE = "ridge probe (image -> TLS score)"
PROBE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 8))
PROBE_COMPONENTS = 256
BANK_SCALE = "log1p_cp10k"  # what the TLS bank returns, whatever the panel's transform


@dataclass
class TlsFold:
    """What one fold needs to score TLS: the model on the fold's genes, the training spots' TLS-gene
    expression (bank output, rows in the training SpotSet's order) and the measured test scores."""

    model: TlsModel
    genes: list[str]  # bank output genes, spelled as in the first training sample
    train_expression: np.ndarray  # (training spots, genes) on BANK_SCALE
    truth: dict[str, np.ndarray]  # test sample -> measured TLS score per spot
    probe: dict[str, float]  # the ridge probe's scores on this fold
    info: dict[str, Any]  # genes used, weight coverage, probe alpha, samples the probe was fitted on


def _upper_columns(adata, genes: Sequence[str]) -> np.ndarray:
    """Column of each of ``genes`` (upper-case names) in ``adata``, matched case-insensitively."""
    names = gene_symbols(adata.var_names)
    return pd.Series(np.arange(len(names)), index=names)[list(genes)].to_numpy()


def _fold_genes(model: TlsModel, adatas: Sequence) -> list[str]:
    """The model's genes (upper case) measured exactly once in every one of ``adatas``."""
    genes = model.weights.index
    for adata in adatas:
        names = gene_symbols(adata.var_names)
        genes = genes.intersection(names[~names.duplicated(keep=False)])
    if len(genes) == 0:
        raise He2stError("no gene of the TLS model is measured in every sample of the fold")
    return list(genes)


def _inner_splits(groups: np.ndarray) -> list | None:
    """Cross-validation splits over training patients (None: one group only, ridge's leave-one-out)."""
    n = len(np.unique(groups))
    return None if n < 2 else list(GroupKFold(n_splits=min(5, n)).split(groups, groups=groups))


def _agreement(predicted: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-sample agreement (:func:`tls_agreement`), averaged over the fold's test samples where it is defined:
    a sample whose measured score is constant (no spot above the others) has no r or AUROC, and would
    otherwise blank the fold's value for the samples that have one."""
    per_sample = [tls_agreement(predicted[s], truth[s]) for s in truth]
    out = {}
    for key in per_sample[0]:
        values = np.array([a[key] for a in per_sample], dtype=np.float64)
        out[f"tls_{key}"] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
    return out


def build_tls_fold(
    samples: Mapping[str, Any], train: SpotSet, test: SpotSet, patients: Mapping[str, str], model: TlsModel
) -> TlsFold:
    """Measured TLS scores (training and test samples), the training bank output and the fitted probe.

    ``samples`` maps sample id -> :class:`~he2st.data.sample.Sample` for the fold's training and test
    samples; ``train``/``test`` are the fold's training spots (with targets) and test inputs, whose
    rows follow each sample's spot order. Test counts are read for the truth only."""
    train_ids = list(dict.fromkeys(train.sample_ids))
    test_ids = list(dict.fromkeys(test.sample_ids))
    genes = _fold_genes(model, [samples[s].adata for s in train_ids + test_ids])
    restricted = model.restricted(pd.Index(genes))
    coverage = float(np.abs(restricted.weights).sum() / np.abs(model.weights).sum())
    if coverage < MIN_WEIGHT_COVERAGE:  # the threshold `he2st tls` refuses calls under, for the same reason
        raise He2stError(f"the fold's samples measure {coverage:.0%} of the TLS model's weight ({len(genes)} of "
                         f"{len(model.weights)} genes), under {MIN_WEIGHT_COVERAGE:.0%}: its score would not be the "
                         "model's; set tls_model to a signature of this tissue and species, or tls to false")
    expression, measured = [], []
    for sid in train_ids:
        adata = samples[sid].adata
        if list(train.barcodes[train.sample_ids == sid]) != list(adata.obs_names):
            raise He2stError(f"training spots of {sid} are not in the sample's order")
        full = transform_counts(adata.X, BANK_SCALE)  # library size over every gene of the spot
        expression.append(np.asarray(full[:, _upper_columns(adata, genes)].todense(), np.float32))
        measured.append(tls_score(adata.X, list(adata.var_names), restricted, "counts").score)
    truth = {s: tls_score(samples[s].adata.X, list(samples[s].adata.var_names), restricted, "counts").score
             for s in test_ids}
    first = samples[train_ids[0]].adata
    spelled = [str(first.var_names[c]) for c in _upper_columns(first, genes)]
    groups = np.array([patients.get(s, s) for s in train.sample_ids])
    probe = make_pipeline(
        StandardScaler(), PCA(min(PROBE_COMPONENTS, *train.features.shape), svd_solver="full"),
        RidgeCV(alphas=PROBE_ALPHAS, cv=_inner_splits(groups)))
    probe.fit(train.features, np.concatenate(measured))
    predicted = {s: probe.predict(test.features[test.sample_ids == s]) for s in test_ids}
    info = {"genes_used": len(genes), "weight_coverage": coverage, "probe_alpha": float(probe[-1].alpha_),
            "probe_fitted_on": sorted(train_ids), "test": sorted(test_ids)}
    return TlsFold(restricted, spelled, np.concatenate(expression), truth, _agreement(predicted, truth), info)


def method_tls_scores(method: Method, fold: TlsFold, train: SpotSet, test: SpotSet) -> dict[str, float]:
    """TLS agreement of a fitted retrieval method on the fold's test samples (its TLS genes retrieved from a
    second bank of the training spots, :meth:`Method.transcriptome_reference`; the method itself is left as
    it was scored)."""
    if not method.retrieves or method.bank is None:
        raise He2stError(f"{method.name} has no reference bank: it predicts the panel only")
    bank = method.transcriptome_reference(train, fold.train_expression, fold.genes)
    whole = {s: method.retrieve(test.subset(test.sample_ids == s), bank) for s in fold.truth}
    predicted = {s: tls_score(p.expression, p.genes, fold.model, BANK_SCALE).score for s, p in whole.items()}
    return _agreement(predicted, fold.truth)


@dataclass
class TlsReport:
    """A benchmark's TLS scores: per (row label, fold), the probe's per fold, what each fold used, and
    why anything was not scored (``skipped``: the whole TLS part, e.g. no model could be read). Scoring
    never stops the benchmark: a fold or method that cannot be scored is listed with its reason."""

    source: str  # the model as configured ('her2st' or a file)
    model: TlsModel | None = None
    skipped: str | None = None
    scores: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    probe: dict[str, dict[str, float]] = field(default_factory=dict)
    folds: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def fold(self, name: str, samples: Mapping[str, Any], train: SpotSet, test: SpotSet,
             patients: Mapping[str, str]) -> TlsFold | None:
        """The fold's TLS data and probe scores (:func:`build_tls_fold`); None when it cannot be built."""
        if self.model is None:
            return None
        try:
            tls = build_tls_fold(samples, train, test, patients, self.model)
        except (He2stError, ValueError) as exc:  # sklearn refuses degenerate inputs with ValueError
            self.failures[name] = str(exc)
            return None
        self.probe[name], self.folds[name] = tls.probe, tls.info
        return tls

    def score(self, label: str, fold: str, methods: Sequence[Method], tls: TlsFold, train: SpotSet,
              test: SpotSet) -> None:
        """One row label's fitted seeds on a fold: scored when they have a bank (retrieval methods), their
        mean over seeds kept, as the benchmark's other scores."""
        if not methods or not all(m.retrieves for m in methods):
            return
        try:
            runs = [method_tls_scores(m, tls, train, test) for m in methods]
        except (He2stError, ValueError) as exc:
            self.failures[f"{label}/{fold}"] = str(exc)
            return
        self.scores[(label, fold)] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}

    def summary(self) -> pd.DataFrame:
        """One row per (method, score), the probe last: mean and sd (ddof=1) over folds, n_folds, fold columns."""
        per_fold = dict(self.scores) | {(PROBE, f): s for f, s in self.probe.items()}
        fold_ids = sorted({f for _, f in per_fold})
        rows = []
        for method in dict.fromkeys(m for m, _ in per_fold):
            mine = {f: s for (m, f), s in per_fold.items() if m == method}
            for score in dict.fromkeys(k for s in mine.values() for k in s):
                v = np.array([s[score] for s in mine.values()], dtype=np.float64)
                rows.append({"method": method, "score": score, "mean": float(v.mean()),
                             "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"), "n_folds": int(v.size),
                             **{f"fold_{f}": mine.get(f, {}).get(score, float("nan")) for f in fold_ids}})
        columns = ["method", "score", "mean", "sd", "n_folds", *(f"fold_{f}" for f in fold_ids)]
        return pd.DataFrame(rows, columns=columns)

    def document(self) -> dict[str, Any]:
        """What results.json keeps under ``tls``."""
        return {"model": self.source, "skipped": self.skipped, "summary": self.summary().to_dict(orient="records"),
                "folds": self.folds, "failures": self.failures}

    def markdown(self) -> str:
        """Methods x (r, AUROC) as ``mean ± sd`` over folds, the probe last, then what was not scored."""
        if self.skipped:
            return f"TLS scores skipped: {self.skipped}\n"
        table = self.summary()
        text = extra_markdown(table) if not table.empty else "no TLS score could be computed\n"
        return text + "".join(f"- not scored: {k}: {v}\n" for k, v in self.failures.items())
