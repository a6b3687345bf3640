"""Reliability: per-gene predictability, conformal intervals and OOD flags, estimated on inner patient folds
and checked on patients the model never saw (synthetic spots whose genes differ in how much of them the
image explains)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.evaluate.reliability import ood_auroc, predictability_spearman, reliability_metrics
from he2st.methods import Method, ModelCard, create_method, load_method
from he2st.methods.calibration import balanced_rows, estimate_reliability, group_weights
from he2st.methods.reliability import Reliability, conformal_quantile

N_PATIENTS, PER_SAMPLE, GENES = 8, 120, 20


def study(seed: int = 0, noise_with_novelty: bool = False) -> SpotSet:
    """One sample per patient; gene g's noise grows with g, so its predictability falls with g, and each
    patient's image features carry a small shift of their own (a batch effect). ``noise_with_novelty``: the
    noise also grows with how far a spot's image lies in the tails, where training spots are sparse."""
    rng = np.random.default_rng(seed)
    n = N_PATIENTS * PER_SAMPLE
    latent = rng.normal(size=(n, 4))
    shift = np.repeat(rng.normal(scale=0.2, size=(N_PATIENTS, 16)), PER_SAMPLE, axis=0)
    features = latent @ rng.normal(size=(4, 16)) + 0.3 * rng.normal(size=(n, 16)) + shift
    signal = latent @ rng.normal(size=(4, GENES))
    noise = rng.normal(size=(n, GENES)) * np.linspace(0.2, 4.0, GENES)
    if noise_with_novelty:
        noise *= 0.2 + np.linalg.norm(latent, axis=1, keepdims=True) ** 2
    return SpotSet(sample_ids=np.repeat(np.array([f"s{i}" for i in range(N_PATIENTS)], dtype=object), PER_SAMPLE),
                   barcodes=np.arange(n).astype(str).astype(object), features=features.astype(np.float32),
                   coords_um=rng.uniform(0, 2000, size=(n, 2)), genes=[f"G{i}" for i in range(GENES)],
                   targets=(signal + noise).astype(np.float32))


def fitted(name: str, train: SpotSet, **options) -> Method:
    method = create_method(name, **options)
    method.card = ModelCard(method=name, panel=GenePanel(genes=train.genes),
                            training_samples={s: f"p{s[1:]}" for s in np.unique(train.sample_ids.astype(str))})
    val = np.isin(train.sample_ids.astype(str), ["s5"])
    method.fit(train.subset(~val), train.subset(val))
    method.reliability = estimate_reliability(method, SpotSet.concat([train.subset(~val), train.subset(val)]))
    return method


@pytest.fixture(scope="module")
def split() -> tuple[SpotSet, SpotSet]:
    spots = study()
    test = np.isin(spots.sample_ids.astype(str), ["s6", "s7"])
    return spots.subset(~test), spots.subset(test)


@pytest.mark.parametrize("name", ["ridge_cv", "knn"])
def test_intervals_cover_new_patients_and_predictability_ranks_genes(split, name):
    train, test = split
    method = fitted(name, train)
    rel = method.reliability
    assert rel.units == "patients" and len(rel.held_out) == 3
    assert (rel.expected_r_low <= rel.expected_r).all()
    pred = method.predict(test)
    for sid in ("s6", "s7"):
        rows = test.sample_ids.astype(str) == sid
        y, lower, upper = test.targets[rows], pred.layers["lower"][rows], pred.layers["upper"][rows]
        assert 0.82 <= ((y >= lower) & (y <= upper)).mean() <= 0.97
        realised = [np.corrcoef(pred.expression[rows, g], y[:, g])[0, 1] for g in range(GENES)]
        assert spearmanr(rel.expected_r, realised).statistic > 0.8
    assert pred.uncertainty["in_distribution"].mean() > 0.9  # patients like the training ones


def test_unlike_images_are_flagged(split):
    train, test = split
    method = fitted("ridge_cv", train)
    usual = method.predict(test)
    strange = SpotSet(**{**test.__dict__, "features": test.features * 3 + 5})
    odd = method.predict(strange)
    assert odd.uncertainty["in_distribution"].mean() < 0.05
    assert (odd.uncertainty["ood_score"] > usual.uncertainty["ood_score"].max()).mean() > 0.95


@pytest.mark.parametrize("novelty", [False, True])
def test_intervals_scale_with_difficulty_only_where_the_training_patients_show_it_pays(novelty):
    """Uniform noise: constant-width intervals (scaling would only move width about). Noise that grows where
    images are unusual: intervals scaled by difficulty, wider there, and still covering."""
    spots = study(seed=1, noise_with_novelty=novelty)
    test = np.isin(spots.sample_ids.astype(str), ["s6", "s7"])
    method = fitted("ridge_cv", spots.subset(~test))
    assert method.reliability.normalised is novelty
    held = spots.subset(test)
    pred = method.predict(held)
    width = (pred.layers["upper"] - pred.layers["lower"]).mean(1)
    inside = (held.targets >= pred.layers["lower"]) & (held.targets <= pred.layers["upper"])
    assert 0.82 <= inside.mean() <= 0.97
    hard = pred.uncertainty["ood_score"] > np.median(pred.uncertainty["ood_score"])
    assert bool(width[hard].mean() > 1.1 * width[~hard].mean()) is novelty


def test_coverage_level_is_honoured(split):
    train, test = split
    method = fitted("ridge_cv", train)
    widths = {}
    for level in (0.5, 0.9):
        method.coverage = level
        pred = method.predict(test)
        inside = (test.targets >= pred.layers["lower"]) & (test.targets <= pred.layers["upper"])
        assert abs(inside.mean() - level) < 0.07
        widths[level] = np.mean(pred.layers["upper"] - pred.layers["lower"])
    assert widths[0.5] < widths[0.9]


def test_every_patient_weighs_the_same_in_the_conformal_quantile():
    """Patients differ in how large their errors are, and one of them brings most of the held-out spots:
    the quantile of the pooled spots is that patient's and misses on new patients, while giving each
    patient an equal say covers a new patient's spots at the level asked."""
    rng = np.random.default_rng(0)

    def patient(n: int, calm: bool = False) -> np.ndarray:
        return np.abs(rng.normal(scale=rng.lognormal(0, 0.5) * (0.3 if calm else 1.0), size=(n, 1)))

    sizes = [3000] + [60] * 11
    scores = np.concatenate([patient(n, calm=i == 0) for i, n in enumerate(sizes)])
    weights = group_weights(np.repeat(np.arange(len(sizes)), sizes))
    assert np.allclose([weights[:3000].sum(), weights[3000:3060].sum()], 1 / 12)
    pooled = conformal_quantile(scores, None, 0.9)[0]
    per_patient = conformal_quantile(scores, weights, 0.9)[0]
    new = [patient(500) for _ in range(400)]
    assert np.mean([(r <= pooled).mean() for r in new]) < 0.7
    assert 0.85 <= np.mean([(r <= per_patient).mean() for r in new]) <= 0.95


def test_kept_scores_are_drawn_evenly_over_patients():
    groups = np.repeat(np.array(["small", "mid", "big"]), [3, 50, 10_000])
    rows = balanced_rows(groups, 100, seed=1)
    assert len(rows) == 100 and (np.diff(rows) > 0).all()
    kept = {g: int((groups[rows] == g).sum()) for g in ("small", "mid", "big")}
    assert kept == {"small": 3, "mid": 48, "big": 49}
    np.testing.assert_array_equal(balanced_rows(groups[:60], 100), np.arange(60))  # all rows when no more


def test_reliability_survives_the_checkpoint(split, tmp_path):
    train, test = split
    method = fitted("knn", train)
    before = method.predict(test)
    method.save(tmp_path / "knn.pt")
    loaded = load_method(tmp_path / "knn.pt")
    after = loaded.predict(test)
    np.testing.assert_allclose(after.layers["upper"], before.layers["upper"], rtol=1e-6)
    np.testing.assert_allclose(after.uncertainty["ood_score"], before.uncertainty["ood_score"], rtol=1e-5)
    np.testing.assert_array_equal(loaded.reliability.expected_r, method.reliability.expected_r)
    np.testing.assert_array_equal(loaded.reliability.weights, method.reliability.weights)


def test_ensemble_reuses_its_inner_folds(split, monkeypatch):
    """The ensemble's members already predicted every inner fold: its reliability costs no further fit."""
    train, test = split
    members = {"knn": {"method": "knn"}, "ridge_cv": {"method": "ridge_cv"}}
    calls = []
    original = Method.out_of_fold
    monkeypatch.setattr(Method, "out_of_fold", lambda self, *a: calls.append(self.name) or original(self, *a))
    method = fitted("ensemble", train, members=members, candidates=[])
    assert calls == []  # the ensemble answered from its own inner folds: no refit through the base class
    pred = method.predict(test)
    inside = (test.targets >= pred.layers["lower"]) & (test.targets <= pred.layers["upper"])
    assert 0.82 <= inside.mean() <= 0.97



def test_the_ensembles_reused_inner_folds_are_combined_without_their_own_measured_values(split, monkeypatch):
    """Each inner fold's reused predictions are combined by weights fitted on the other folds only (the final
    model's weights saw every fold's measured values), and smoothed as the ensemble's predictions are."""
    import he2st.methods.models.ensemble as ensemble_module

    train, _ = split
    fitted_on: list[set[str]] = []  # the patients of each combination's rows (sample sK is patient pK)
    original = ensemble_module.fit_combination
    monkeypatch.setattr(ensemble_module, "fit_combination", lambda preds, y, sids, *a: fitted_on.append(
        {"p" + s[1:] for s in np.asarray(sids).astype(str)}) or original(preds, y, sids, *a))
    members = {"knn": {"method": "knn"}, "ridge_cv": {"method": "ridge_cv"}}
    method = fitted("ensemble", train, members=members, candidates=[], context=[], smoothing=[])
    folds = [set(fold) for fold in method.reliability.held_out]
    everything = set().union(*folds)
    assert len(folds) == 3 and fitted_on[0] == everything  # the final weights: every inner fold
    assert fitted_on[1:] == [everything - fold for fold in folds]  # each fold's: the others only

    spots = SpotSet.concat([train.subset(train.sample_ids.astype(str) != "s5"),
                            train.subset(train.sample_ids.astype(str) == "s5")])
    groups = method.training_groups(spots)
    held_out = [np.array(sorted(fold)) for fold in method.reliability.held_out]
    plain, _ = method.out_of_fold(spots, groups, held_out)
    method.config = method.config.model_copy(update={"smooth_neighbours": 6})
    smooth, _ = method.out_of_fold(spots, groups, held_out)
    expected = method.smoothed(ensemble_module.Prediction(plain.copy(), train.genes), spots).expression
    np.testing.assert_allclose(smooth, expected, rtol=1e-6)
    assert not np.allclose(smooth, plain)

def test_a_score_of_many_genes_is_judged_on_itself(split):
    """A sum of genes averages their errors out: its expected r on new patients exceeds that of its genes, and
    the call threshold set on held-out training patients finds their top tenth better than chance."""
    train, _ = split
    method = create_method("ridge_cv")
    method.card = ModelCard(method="ridge_cv", panel=GenePanel(genes=train.genes),
                            training_samples={s: f"p{s[1:]}" for s in np.unique(train.sample_ids.astype(str))})
    method.fit(train, train.subset(np.zeros(len(train), bool)))
    rel = estimate_reliability(method, train, scores={
        "sum": lambda values, genes: (values.sum(1), list(genes)),
        "absent": lambda values, genes: None})
    assert set(rel.scores) == {"sum"}
    entry = rel.scores["sum"]
    assert entry["expected_r"] > np.median(rel.expected_r) and entry["expected_r_low"] <= entry["expected_r"]
    assert entry["precision"] > 0.3 and 0 < entry["recall"] <= 1 and entry["genes_used"] == len(train.genes)
    assert entry["genes"] == sorted(train.genes)  # which genes, so a prediction scored on others is not matched
    assert Reliability.from_state(rel.state(), rel.layout()).scores == rel.scores


def test_one_group_is_refused_in_one_line(split):
    train, _ = split
    one = train.subset(train.sample_ids.astype(str) == "s0")
    method = create_method("ridge_cv")
    method.card = ModelCard(method="ridge_cv", panel=GenePanel(genes=one.genes), training_samples={"s0": "p0"})
    method.fit(one)
    with pytest.raises(He2stError, match="at least 2 training patients or samples"):
        estimate_reliability(method, one)

def test_a_tiny_section_has_no_say_and_an_undefined_gene_is_nan():
    """A held-out section of a few spots (an edge fragment) would carry a whole patient's say with a
    correlation that is mostly chance: it does not count. A gene constant on every held-out section has no
    expected r (NaN), not a measured zero."""
    from he2st.methods.calibration import MIN_SECTION_SPOTS, _gene_predictability

    rng = np.random.default_rng(0)
    sizes = {"a": 300, "b": 300, "c": 300, "d": 300}
    samples = np.concatenate([[s] * n for s, n in sizes.items()])
    true = rng.normal(size=(len(samples), 3))
    pred = true[:, :1] * 0.3 + rng.normal(size=(len(samples), 1))  # gene 0: r about 0.3
    pred = np.concatenate([pred, rng.normal(size=(len(samples), 1)), np.ones((len(samples), 1))], 1)
    true[:, 2] = 1.0  # gene 2: constant
    expected, low, _ = _gene_predictability(pred, true, samples, samples)
    tiny = MIN_SECTION_SPOTS - 1
    with_tiny = _gene_predictability(np.concatenate([pred, -true[:tiny]]), np.concatenate([true, true[:tiny]]),
                                     np.concatenate([samples, ["e"] * tiny]), np.concatenate([samples, ["e"] * tiny]))
    np.testing.assert_allclose(with_tiny[0][:2], expected[:2])
    np.testing.assert_allclose(with_tiny[1][:2], low[:2])
    assert 0.2 < expected[0] < 0.4 and low[0] < expected[0]
    assert np.isnan(expected[2]) and np.isnan(low[2]) and np.isnan(with_tiny[0][2])



def test_every_patient_keeps_its_say_in_a_gene_whatever_its_sections_define():
    """A gene constant in one of a patient's two sections leaves that patient's other section with the
    patient's whole say; a flat predicted map of a gene that varies counts as r = 0 (it says nothing of the
    gene), not as a section left out, which would credit the gene with the patients the model follows."""
    from he2st.methods.calibration import _gene_predictability

    rng = np.random.default_rng(0)
    samples = np.repeat(["a1", "a2", "b1"], 200)
    groups = np.repeat(["A", "A", "B"], 200)
    true = rng.normal(size=(600, 3))
    pred = true.copy()
    a = groups == "A"
    pred[a] = true[a] + 0.5 * rng.normal(size=(a.sum(), 3))  # patient A: r about 0.9
    pred[~a] = rng.normal(size=((~a).sum(), 3))  # patient B: r about 0
    true[samples == "a2", 1] = 2.0  # gene 1 constant in a2: a1 speaks for patient A alone
    pred[samples == "b1", 2] = 0.0  # gene 2: a flat map on patient B
    expected, _, _ = _gene_predictability(pred, true, samples, groups)
    z = np.arctanh
    with np.errstate(invalid="ignore", divide="ignore"):  # the constant columns' correlations are not used
        per = {s: np.array([np.corrcoef(pred[samples == s, g], true[samples == s, g])[0, 1] for g in range(3)])
               for s in ("a1", "a2", "b1")}
    equal_say = np.tanh((z(per["a1"][1]) + z(per["b1"][1])) / 2)
    assert expected[1] == pytest.approx(equal_say, abs=1e-5)
    assert expected[2] == pytest.approx(np.tanh((z(per["a1"][2]) + z(per["a2"][2])) / 4), abs=1e-5)
    assert expected[2] < 0.6 < expected[0]


def test_the_interval_kind_is_chosen_with_every_patient_held_out_alone():
    """With more patients than inner folds, a fold holds several; the choice between constant and
    difficulty-scaled intervals still scores each patient alone with an equal say, so three large patients
    whose errors grow with difficulty do not outvote three small ones whose errors shrink with it."""
    from he2st.methods.calibration import _difficulty_pays

    rng = np.random.default_rng(1)
    sizes = {"A": 1500, "B": 1500, "C": 1500, "D": 60, "E": 60, "F": 60}
    groups = np.concatenate([[g] * n for g, n in sizes.items()])
    difficulty = rng.uniform(0.5, 2.0, len(groups))
    large = np.isin(groups, ["A", "B", "C"])
    scale = np.where(large, difficulty, 4.0 / difficulty)
    residuals = np.abs(rng.normal(size=(len(groups), 4)) * scale[:, None])
    assert _difficulty_pays(residuals, difficulty, groups) is False
    assert _difficulty_pays(residuals[large], difficulty[large], groups[large]) is True


def test_metrics_on_known_values():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 5))
    pred = truth + rng.normal(scale=0.1, size=truth.shape)
    pred[:20] += 3  # the worst decile
    score = np.zeros(200)
    score[:20] = 1
    assert ood_auroc(score, pred, truth) == 1.0
    bounds = np.stack([pred - 0.5, pred + 0.5])
    out = reliability_metrics(pred, truth, bounds, bounds, score, np.ones(200))
    assert out["coverage90"] == pytest.approx(0.9, abs=0.01)
    assert out["interval_width90"] == pytest.approx(1.0)
    assert out["ood_fraction"] == 0.0
    assert predictability_spearman(np.arange(5.0), np.array([0.1, 0.2, np.nan, 0.4, 0.5])) == pytest.approx(1.0)


def test_train_predict_and_report_carry_the_reliability(tmp_path):
    """`he2st train` on three patients calibrates the model by default; its card says how predictable each gene
    is; a slide predicted with it has intervals, per-gene expected r and OOD flags; the report leads with them."""
    import sys

    import anndata as ad
    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from synthetic import embedded_sections

    from he2st.encoders import create
    from he2st.methods import read_card
    from he2st.report.html import build_report
    from he2st.workflows.config import TrainRunConfig
    from he2st.workflows.predict_slide import predict_slide
    from he2st.workflows.train import train_model

    genes = [f"G{i}" for i in range(8)]
    work, embed = embedded_sections(tmp_path, {"S1": "P0", "S2": "P1", "S3": "P2"}, genes)
    model = tmp_path / "knn.pt"
    method, _, _ = train_model(TrainRunConfig(work_dir=work, method="knn", out=model, embed=embed,
                                              genes={"n_genes": 8, "min_spot_fraction": 0.0},
                                              n_top=4, method_options={"knn": {"top_k": 5}}))
    card = read_card(model)
    assert card.reliability["units"] == "patients" and len(card.reliability["held_out"]) == 3
    assert "mean expected r" in dict(card.describe())["reliability"]
    torch.manual_seed(0)
    encoder = create("test_vit", pretrained=False)
    encoder.backbone.load_state_dict(torch.load(embed.weights))
    sample = work / "samples" / "S1.h5ad"
    out = predict_slide(model, None, tmp_path / "pred", spots_from=sample, encoder=encoder, coverage=0.8)
    pred = ad.read_h5ad(out)
    assert {"lower", "upper"} <= set(pred.layers) and {"ood_score", "in_distribution"} <= set(pred.obs)
    assert (pred.layers["lower"] <= pred.X).all() and (pred.X <= pred.layers["upper"]).all()
    np.testing.assert_allclose(pred.var["expected_r"], method.reliability.gene_columns(list(pred.var_names))["expected_r"])
    assert pred.uns["he2st"]["coverage"] == 0.8
    page = build_report(out, tmp_path / "report.html").read_text()
    assert "How far to trust it" in page and "80% conformal interval" in page
    best = pred.var["expected_r"].sort_values(ascending=False).index[0]
    assert best in page.split("Predicted expression")[0]


def test_a_card_without_reliability_says_when_it_is_estimated():
    """The card's line agrees with train's rule: by default from 3 training patients, from 2 when asked."""
    from he2st.workflows.config import TrainRunConfig

    card = ModelCard(method="knn", panel=GenePanel(genes=["G0"]), training_samples={"A1": "A", "B4": "B"})
    line = dict(card.describe())["reliability"]
    assert TrainRunConfig().wants_reliability(card.training_samples) is False
    assert TrainRunConfig(reliability=True).wants_reliability(card.training_samples) is True
    assert "3 or more training patients" in line and "reliability=true" in line and "from 2" in line
