"""Gene panels, target transforms and fold builders."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from he2st.data.genes import GenePanel, transform_counts
from he2st.data.splits import (
    check_fold,
    inner_folds,
    leave_one_patient_out,
    leave_one_sample_out,
    make_folds,
    validation_mask,
)
from he2st.errors import He2stError



def _ad(counts, genes):
    import pandas as pd

    return ad.AnnData(X=np.asarray(counts, np.float32), var=pd.DataFrame(index=genes))


def test_cp10k_uses_library_size_of_all_genes():
    out = transform_counts(np.array([[1, 3, 6], [0, 0, 0]]), "log1p_cp10k").toarray()
    np.testing.assert_allclose(out[0], np.log1p(np.array([1, 3, 6]) / 10 * 1e4), rtol=1e-6)
    assert (out[1] == 0).all()
    np.testing.assert_allclose(transform_counts(np.array([[2.0]]), "log1p").toarray(), [[np.log1p(2)]])


def test_panel_heg_hvg_and_common_genes_from_training_only():
    train = {
        "s1": _ad([[10, 1, 0, 5], [12, 0, 0, 50], [8, 1, 1, 1]], ["A", "B", "C", "D"]),
        "s2": _ad([[9, 1, 5], [11, 2, 60], [10, 0, 2]], ["A", "B", "D"]),  # no gene C
    }
    heg = GenePanel.fit(train, n_genes=2, selection="heg", transform="log1p", min_spot_fraction=0.5)
    assert heg.genes == ["A", "D"] and heg.fitted_on == ["s1", "s2"]
    hvg = GenePanel.fit(train, n_genes=1, selection="hvg", transform="log1p", min_spot_fraction=0.5)
    assert hvg.genes == ["D"]
    with pytest.raises(He2stError, match="only 2 genes"):
        GenePanel.fit(train, n_genes=3, transform="log1p", min_spot_fraction=0.9)


def test_hvg_panel_ranks_variance_without_float32_round_off():
    # A gene constant at log1p(200) over thousands of spots has variance 0; summed in float32, E[x^2] - E[x]^2
    # gave it more than a gene alternating between 200 and 210 counts (true variance 5.9e-4).
    n = 5000
    counts = np.column_stack([np.full(n, 200.0), np.where(np.arange(n) % 2, 200.0, 210.0)])
    train = {"s": _ad(counts, ["A_constant", "B_varies"])}
    panel = GenePanel.fit(train, n_genes=1, selection="hvg", transform="log1p", min_spot_fraction=0)
    assert panel.genes == ["B_varies"]


def test_panel_targets_are_always_on_the_transform_scale_and_roundtrip_as_json():
    train = {"s": _ad(np.random.default_rng(0).poisson(5, (30, 4)), ["A", "B", "C", "D"])}
    panel = GenePanel.fit(train, n_genes=3)
    y = panel.targets(train["s"])
    assert (y >= 0).all() and y.mean() > 1  # log1p CP10k, never z-scores
    assert "standardize" not in GenePanel.model_fields and "mean" not in GenePanel.model_fields
    assert GenePanel.model_validate_json(panel.model_dump_json()) == panel


def test_missing_gene_policy():
    panel = GenePanel(genes=["A", "Z"], transform="log1p")
    with pytest.raises(He2stError, match="Z"):
        panel.targets(_ad([[1, 2]], ["A", "B"]))
    zero = GenePanel(genes=["A", "Z"], transform="log1p", missing="zero").targets(_ad([[1, 2]], ["A", "B"]))
    np.testing.assert_allclose(zero, [[np.log1p(1), 0]])


PATIENTS = {"A1": "A", "B1": "B", "B2": "B", "C1": "C"}


def test_lopo_and_loso():
    lopo = leave_one_patient_out(PATIENTS)
    assert [f.test for f in lopo] == [["A1"], ["B1", "B2"], ["C1"]]
    for fold in lopo:
        check_fold(fold, PATIENTS)
    loso = leave_one_sample_out(PATIENTS)
    b1 = next(f for f in loso if f.test == ["B1"])
    assert "B2" not in b1.train and not b1.leaky  # sibling section removed from training
    leaky = leave_one_sample_out(PATIENTS, allow_shared_patients=True)
    b1 = next(f for f in leaky if f.test == ["B1"])
    assert "B2" in b1.train and b1.leaky and "LEAKY" in b1.name
    bad = b1.model_copy(update={"shared_patients": []})
    with pytest.raises(He2stError, match="both sides"):
        check_fold(bad, PATIENTS)
    with pytest.raises(He2stError, match="unknown fold scheme"):
        make_folds(PATIENTS, "random")


def test_inner_folds_never_contain_the_outer_test_patient():
    """Nested selection: the folds inside patient_B's training set are A-vs-C only."""
    outer = leave_one_patient_out(PATIENTS)
    inner = inner_folds(outer, PATIENTS, "patient_B")
    assert [(f.name, f.train, f.test) for f in inner] == [
        ("patient_B__patient_A", ["C1"], ["A1"]), ("patient_B__patient_C", ["A1"], ["C1"])]
    assert [f.test for f in inner_folds(outer, PATIENTS, "patient_A", "loso")] == [["B1"], ["B2"], ["C1"]]
    with pytest.raises(He2stError, match="no fold named 'patient_X'"):
        inner_folds(outer, PATIENTS, "patient_X")
    two = {"A1": "A", "B1": "B"}
    with pytest.raises(He2stError, match="trains on one patient"):
        inner_folds(leave_one_patient_out(two), two, "patient_A")


def test_validation_mask_only_touches_given_training_groups():
    groups = np.array(["a"] * 50 + ["b"] * 50)
    mask = validation_mask(groups, fraction=0.2, seed=1)
    assert mask[:50].sum() == 10 and mask[50:].sum() == 10
    groups3 = np.repeat(["a", "b", "c", "d"], 10)
    mask3 = validation_mask(groups3, fraction=0.25, seed=1)
    assert len(np.unique(groups3[mask3])) == 1 and mask3.sum() == 10  # a whole sample held out


def test_inner_folds_hold_out_whole_groups_and_stay_few():
    from he2st.data.splits import held_out_groups

    assert held_out_groups(np.array(["P1"] * 5), 3) == []
    two = held_out_groups(np.array(["P2", "P1", "P2"]), 3)
    assert [list(f) for f in two] == [["P1"], ["P2"]]
    many = held_out_groups(np.repeat([f"s{i:02d}" for i in range(20)], 4), 3)
    assert len(many) == 3 and sorted(np.concatenate(many)) == [f"s{i:02d}" for i in range(20)]


def test_a_one_patient_study_gets_folds_by_following_the_line_that_refuses_lopo(tmp_path):
    """One patient with several sections (a serial-section study) has no leave-one-patient-out folds; the line
    saying so offers leave-one-sample-out. Each held-out section's siblings are then its only training data, so
    the offered settings must allow them, or preparing as told fails on its first sample."""
    import re

    from synthetic import prepared_sections

    from he2st.data.workspace import Workspace
    from he2st.workflows.benchmark import missing_folds
    from he2st.workflows.config import PrepareConfig, load_config
    from he2st.workflows.prepare import prepare

    work = prepared_sections(tmp_path, {"S1": "P", "S2": "P", "S3": "P"}, [f"G{i}" for i in range(10)], side=3)
    line = str(missing_folds(Workspace(work), "lopo"))
    prepare_command = re.search(r"`he2st prepare ([^`]*)`", line).group(1)
    overrides = re.findall(r"--set (\S+)", prepare_command)
    raw = tmp_path / "raw"
    sources = [{"reader": "st", "sample_id": s, "patient_id": "P", "path": raw / s / "cnts.tsv.gz",
                "spots_file": raw / s / "sel.tsv", "image": raw / s / "he.jpg"} for s in ("S1", "S2", "S3")]
    prepare(load_config(PrepareConfig, None, overrides, work_dir=str(work), context_field=False,
                        data={"dataset": None, "samples": sources}))
    folds, _ = Workspace(work).load_folds("loso")
    assert [f.test for f in folds] == [["S1"], ["S2"], ["S3"]] and all(f.leaky for f in folds)
    with pytest.raises(He2stError, match="every other sample is of its patient P; allow_shared_patients"):
        leave_one_sample_out({"S1": "P", "S2": "P"})


def test_validation_never_takes_every_section_of_a_training_patient():
    """Validation sections are drawn among patients that keep another in training; drawn several at a time,
    they may still be all of a patient's sections (2 of patient A's 2 beside 12 of B's): one goes back."""
    import numpy as np

    from he2st.data.splits import validation_mask

    groups = np.array(["A1"] * 10 + ["A2"] * 10 + [f"B{i}" for i in range(12) for _ in range(10)])
    patients = np.array([g[0] for g in groups])
    masks = [validation_mask(groups, 0.15, seed, patients) for seed in range(400)]
    assert not any(m[patients == "A"].all() for m in masks)
    assert any(m[patients == "A"].any() for m in masks) and all(m.any() for m in masks)
