"""Estimate a model's :class:`~he2st.methods.reliability.Reliability` on inner patient-level folds.

Each inner fold holds out whole training patients (whole samples when there is one patient), fits the
method on the rest exactly as it is fitted on everything, and predicts the held-out spots from their
images. Those out-of-fold predictions give each gene's Pearson on unseen sections, the conformal scores of
unseen spots, and -- with the distances of held-out spots to *their* fold's training spots -- the
out-of-distribution threshold. Nothing here reads a spot the outer caller holds out: the caller passes
training spots only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from he2st.data.splits import held_out_groups
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Method
from he2st.methods.reliability import MAX_SCORES, FeatureDistance, Reliability, conformal_quantile
from he2st.stats import constant_columns, pearson_per_gene

LOWER_BOUND_LEVEL = 0.9  # one-sided confidence of expected_r_low
OOD_LEVEL = 0.99  # quantile of held-out patients' difficulty above which a spot is flagged
CALL_FRACTION = 0.1  # a score's calls are judged against each held-out section's top tenth of measured scores
#: fewest spots of a held-out section whose per-gene Pearson counts: below it a correlation is mostly chance
#: (its Fisher-z standard error, 1/sqrt(n - 3), exceeds 0.38) and would still carry a whole patient's say
MIN_SECTION_SPOTS = 10

#: a per-spot score of one section's expression (values, gene names) and the genes it used, or None when too
#: few of its genes are there
SectionScore = Callable[[np.ndarray, list[str]], "tuple[np.ndarray, list[str]] | None"]


def estimate_reliability(method: Method, spots: SpotSet, seed: int = 0,
                         validation_fraction: float = 0.15, beyond: np.ndarray | None = None,
                         beyond_genes: list[str] | None = None,
                         scores: dict[str, SectionScore] | None = None) -> Reliability:
    """Reliability of ``method`` (already fitted on ``spots``, which carry targets) from inner folds; every
    spot is held out by exactly one fold, in as many folds as the method's own inner folds (3 by default).
    ``beyond`` (N, B): the spots' values of ``beyond_genes`` outside the panel, which a retrieval method's
    transcriptome bank returns: their expected r is measured too.
    ``scores``: named per-spot scores of a section's expression (e.g. TLS signatures), whose own predictability
    and call threshold are measured on the same held-out sections (:func:`_score_predictability`).
    Refused in one line when the spots hold a single group."""
    groups = np.asarray(method.training_groups(spots)).astype(str)
    folds = held_out_groups(groups, getattr(method.config, "inner_folds", 3))
    if not folds:
        raise He2stError("reliability needs at least 2 training patients or samples to hold out")
    oof, oof_beyond = method.out_of_fold(spots, groups, folds, validation_fraction, beyond, beyond_genes)
    difficulty = np.empty(len(spots))
    for fold in folds:
        test = np.isin(groups, fold)
        difficulty[test] = FeatureDistance.fit(spots.features[~test], seed=seed).distances(spots.features[test])
    residuals = np.abs(spots.targets - oof)
    samples = np.asarray(spots.sample_ids).astype(str)
    expected, low, n_sections = _gene_predictability(oof, spots.targets, samples, groups)
    genes = list(spots.genes)
    predicted, measured = oof, spots.targets
    if oof_beyond is not None:
        predicted, measured = np.concatenate([oof, oof_beyond], 1), np.concatenate([spots.targets, beyond], 1)
        more, more_low, _ = _gene_predictability(oof_beyond, beyond, samples, groups)
        expected, low = np.concatenate([expected, more]), np.concatenate([low, more_low])
        genes += list(beyond_genes)
    rows = balanced_rows(groups, MAX_SCORES, seed)
    return Reliability(
        genes=genes, expected_r=expected, expected_r_low=low,
        residuals=residuals[rows].astype(np.float32), difficulty=difficulty[rows].astype(np.float32),
        weights=group_weights(groups[rows]).astype(np.float32),
        distance=FeatureDistance.fit(spots.features, seed=seed),
        ood_threshold=float(conformal_quantile(difficulty[:, None], group_weights(groups), OOD_LEVEL)[0]),
        ood_level=OOD_LEVEL,
        normalised=_difficulty_pays(residuals[rows], difficulty[rows], groups[rows]),
        held_out=[[str(g) for g in fold] for fold in folds],
        units="samples" if np.array_equal(groups, samples) else "patients", n_sections=n_sections,
        scores=_score_predictability(scores or {}, predicted, measured, genes, samples, groups))


def _score_predictability(scores: dict[str, SectionScore], predicted: np.ndarray, measured: np.ndarray,
                          genes: list[str], samples: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Each score's expected Pearson on a new patient (and its lower bound), and a call threshold with its error.

    A score summing many genes can follow its measured counterpart far better than its genes do one by one
    (their errors average out), so whether calls may be made from it is judged on the score itself, computed
    section by section from held-out predictions and from measured values alike. The threshold is the
    ``1 - CALL_FRACTION`` quantile of the held-out predicted scores pooled over sections, so a section calls
    more or fewer spots as its predicted scores are higher or lower; its precision is the share of those calls
    that lie above their section's ``1 - CALL_FRACTION`` quantile of measured scores (the base rate is about
    ``CALL_FRACTION``; fewer where many spots tie, as zero counts do)."""
    out: dict[str, dict[str, float]] = {}
    sections = np.unique(samples)
    for name, score in scores.items():
        pred, true = np.empty(len(samples)), np.empty(len(samples))
        for s in sections:
            rows = samples == s
            p, t = score(predicted[rows], genes), score(measured[rows], genes)
            if p is None or t is None:
                break
            (pred[rows], used), true[rows] = p, t[0]
        else:
            expected, low, _ = _gene_predictability(pred[:, None], true[:, None], samples, groups)
            threshold = float(np.quantile(pred, 1 - CALL_FRACTION))
            top = np.zeros(len(samples), bool)
            for s in sections:
                rows = np.flatnonzero(samples == s)
                top[rows] = true[rows] > np.quantile(true[rows], 1 - CALL_FRACTION)  # ties at it (zeros) are not top
            called = pred >= threshold
            out[name] = {"expected_r": round(float(expected[0]), 4), "expected_r_low": round(float(low[0]), 4),
                         "threshold": threshold, "precision": round(float(top[called].mean()), 4),
                         "recall": round(float(called[top].mean()), 4), "genes_used": len(used),
                         "genes": sorted(used)}
    return out


def _difficulty_pays(residuals: np.ndarray, difficulty: np.ndarray, groups: np.ndarray,
                     coverage: float = 0.9) -> bool:
    """Whether intervals scaled by each spot's difficulty beat constant-width ones on the training patients.

    Each held-out group (patient, or sample) in turn is scored with intervals calibrated on the other groups'
    held-out spots (all of them held out by models that never saw them, so no refit is needed), every group
    with an equal say in the calibration and in the comparison, as in the intervals themselves; the two kinds
    are compared by their mean interval score (Winkler's: width plus 2/alpha times the distance by which a
    value falls outside), a proper scoring rule that rewards narrow intervals only while they cover.
    Difficulty pays where image novelty tracks the size of the errors; where it does not, scaling by it only
    moves width from where it is needed. With one group there is nothing to compare on: constant width."""
    labels = np.asarray(groups).astype(str)
    if len(np.unique(labels)) < 2:
        return False
    alpha = 1.0 - coverage
    scores = {False: [], True: []}
    for group in np.unique(labels):
        test = labels == group
        calib = ~test
        for normalised in (False, True):
            s_cal = np.ones(calib.sum()) if not normalised else np.maximum(difficulty[calib], 1e-12)
            s_test = np.ones(test.sum()) if not normalised else np.maximum(difficulty[test], 1e-12)
            weights = group_weights(labels[calib])
            quantile = conformal_quantile(residuals[calib] / s_cal[:, None], weights, coverage)
            half = quantile[None, :] * s_test[:, None]
            miss = np.maximum(residuals[test] - half, 0.0)
            scores[normalised].append(float(np.mean(2 * half + (2 / alpha) * miss)))
    return float(np.mean(scores[True])) < float(np.mean(scores[False]))


def balanced_rows(groups: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` rows, sorted, drawn (seeded) as evenly over the groups as their sizes allow: every row
    when there are no more, else each group as many as the smaller groups leave. Groups weigh the same in
    the conformal quantile, so a small patient must keep enough rows to carry its weight."""
    rng = np.random.default_rng(seed)
    _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [rng.permutation(np.flatnonzero(index == g)) for g in range(index.max() + 1)]
    order = sorted(range(len(members)), key=lambda g: len(members[g]))
    left, chosen = limit, []
    for i, g in enumerate(order):
        take = min(len(members[g]), left // (len(order) - i))
        chosen.append(members[g][:take])
        left -= take
    return np.sort(np.concatenate(chosen))


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Weights of rows summing to 1 in which every group (patient, or sample) weighs the same, however many
    rows it has: conformal quantiles under them are those of a spot of a new patient, not of a spot drawn
    from the pooled rows, where the patient with most spots would set the interval."""
    _, index, counts = np.unique(np.asarray(groups).astype(str), return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[index])


def _gene_predictability(pred: np.ndarray, true: np.ndarray, samples: np.ndarray, groups: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Each gene's expected Pearson on a new patient and a one-sided lower bound of it (NaN for a gene
    measured constant in every held-out section, or measured nowhere).

    Per-section correlations are averaged on Fisher's z scale (correlations are bounded and skewed near their
    limits), each held-out patient (or sample, when samples are the groups) with an equal say: sections of one
    patient are alike, and a patient cut into many sections would otherwise outvote the rest. Within a patient
    each section weighs by its Fisher-z precision, n - 3 for n spots, among the sections that count for the
    gene. A section counts unless it has fewer than ``MIN_SECTION_SPOTS`` spots or the gene's measured values
    are constant there (no pattern to follow); a patient left with none has no say. Where the measured values
    vary but the prediction is constant, the section counts as r = 0: a flat map says nothing of the gene, and
    leaving such sections out would credit the gene with the patients where the model does follow it. The
    bound uses the t quantile with Kish's effective number of sections; with one section it is -1 (nothing is
    known of the spread between sections)."""
    samples, groups = samples.astype(str), np.asarray(groups).astype(str)
    sections = np.unique(samples)
    per_section = np.stack([pearson_per_gene(pred[samples == s], true[samples == s]) for s in sections])
    flat_map = np.stack([~constant_columns(true[samples == s]) for s in sections]) & np.isnan(per_section)
    per_section[flat_map] = 0.0
    group_of = np.array([groups[samples == s][0] for s in sections])
    n_spots = np.array([(samples == s).sum() for s in sections])
    precision = np.where(n_spots >= MIN_SECTION_SPOTS, n_spots - 3.0, 0.0)
    z = np.arctanh(np.clip(per_section, -0.999, 0.999))
    ok = np.isfinite(z)
    counted = np.where(ok, precision[:, None], 0.0)  # (sections, genes)
    of_group = np.stack([counted[group_of == g].sum(0) for g in group_of])  # each section's patient's total, per gene
    w = np.divide(counted, of_group, out=np.zeros_like(counted), where=of_group > 0)
    total = w.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w * np.where(ok, z, 0.0)).sum(0) / total
        var = (w * np.where(ok, (z - mean) ** 2, 0.0)).sum(0) / total
        n_eff = total**2 / (w**2).sum(0)
        spread = np.sqrt(var * n_eff / np.maximum(n_eff - 1, 1e-12))  # unbiased sd with n_eff sections
        t = stats.t.ppf(LOWER_BOUND_LEVEL, np.maximum(n_eff - 1, 1))
        low = np.where(n_eff > 1.5, mean - t * spread / np.sqrt(n_eff), -np.inf)
    expected = np.tanh(mean)  # NaN where no section counts
    lower = np.where(np.isfinite(low), np.tanh(np.nan_to_num(low, nan=-10.0)), np.where(np.isnan(mean), np.nan, -1.0))
    return expected.astype(np.float32), np.minimum(lower, expected).astype(np.float32), len(sections)
