"""Cell types from a single-cell reference: Tangram (cluster mode) recovers known proportions of a synthetic
mixture, CarHE trains its third modality on them and records the reference in its model card."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.io import sha256_file
from he2st.methods import create_method
from he2st.methods.layers.deconvolution import tangram_proportions
from he2st.stats import pearson_per_gene

TYPES = ["B-cells", "CAFs", "Epithelial", "T-cells"]
GENES = [f"G{i}" for i in range(60)]


def _profiles() -> np.ndarray:
    """Mean counts per cell type (types x genes): 10 marker genes per type on a shared background."""
    profiles = np.full((len(TYPES), len(GENES)), 1.0)
    for t in range(len(TYPES)):
        profiles[t, t * 10:(t + 1) * 10] = 20.0
    return profiles


def _reference(path, n_cells: int = 300, seed: int = 0):
    """A single-cell reference: counts in X (genes lower-case, as some atlases spell them), types in obs, in
    other shares than in the tissue (so the types' cell counts must be weighed back)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(len(TYPES), n_cells, p=[0.4, 0.3, 0.2, 0.1])  # an atlas samples types unevenly
    labels = np.array(TYPES)[kind]
    counts = rng.poisson(_profiles()[kind] * rng.uniform(0.5, 1.5, (n_cells, 1)))
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)),
                       obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[g.lower() for g in GENES]))
    adata.write_h5ad(path)
    return path


def _mixture(n_spots: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Spots of 10 cells each in known proportions, Poisson counts -> log1p CP10k targets; and the proportions."""
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.ones(len(TYPES)), n_spots)
    counts = rng.poisson(10 * props @ _profiles()).astype(np.float64)
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32), props


def test_tangram_recovers_known_proportions_of_a_synthetic_mixture(tmp_path):
    reference = _reference(tmp_path / "ref.h5ad")
    targets, truth = _mixture()
    result = tangram_proportions(reference, "cell_type", targets, GENES, seed=0, epochs=300)
    assert result.types == sorted(TYPES) and result.proportions.shape == (200, 4)
    np.testing.assert_allclose(result.proportions.sum(1), 1.0, atol=1e-5)
    r = pearson_per_gene(result.proportions, truth[:, [TYPES.index(t) for t in result.types]])
    assert np.mean(r) > 0.8, r  # measured: 0.99 for every type
    # the reference's skewed type shares are not taken for the tissue's (weighing them in doubles this error)
    assert np.abs(result.proportions - truth[:, [TYPES.index(t) for t in result.types]]).mean() < 0.06
    record = result.record
    assert record["reference_sha256"] == sha256_file(reference) and record["celltype_key"] == "cell_type"
    assert record["genes"] == sorted(GENES) and record["n_cells"] == 300 and record["n_spots"] == 200


def test_bad_references_are_refused_in_one_line_naming_the_file(tmp_path, monkeypatch):
    targets, _ = _mixture(20)
    with pytest.raises(He2stError, match="cannot read the single-cell reference") as missing:
        tangram_proportions(tmp_path / "none.h5ad", "cell_type", targets, GENES)
    assert "none.h5ad" in str(missing.value) and "\n" not in str(missing.value)
    reference = _reference(tmp_path / "ref.h5ad", n_cells=40)
    with pytest.raises(He2stError, match="no obs column 'celltype'") as column:
        tangram_proportions(reference, "celltype", targets, GENES)
    assert "ref.h5ad" in str(column.value)
    with pytest.raises(He2stError, match="measures 0 of the panel's genes"):
        tangram_proportions(reference, "cell_type", targets, [f"X{i}" for i in range(60)])
    monkeypatch.setitem(sys.modules, "tangram", None)  # not installed
    with pytest.raises(He2stError, match=r"he2st\[deconvolution\]"):
        tangram_proportions(reference, "cell_type", targets, GENES)
    with pytest.raises(He2stError, match="needs celltype_reference"):
        create_method("carhe", celltypes_from="reference")


def test_carhe_trains_on_reference_cell_types_and_records_them(tmp_path):
    """Spots whose image features carry their composition: CarHE learns the deconvolved proportions as its
    third modality, predicts them from the image, and its selection log (the model card) names the reference."""
    reference = _reference(tmp_path / "ref.h5ad")
    targets, truth = _mixture(240, seed=2)
    rng = np.random.default_rng(3)
    features = np.c_[truth, rng.normal(size=(240, 12))] + rng.normal(0, 0.05, (240, 16))
    n = len(targets)
    spots = SpotSet(np.array(["S1"] * 120 + ["S2"] * 120, dtype=object), np.arange(n).astype(str).astype(object),
                    features.astype(np.float32), np.c_[np.arange(n) % 12, np.arange(n) // 12] * 100.0, GENES, targets)
    train, test = spots.subset(np.arange(n) < 180), spots.subset(np.arange(n) >= 180)
    carhe = create_method("carhe", celltypes_from="reference", celltype_reference=str(tmp_path / "ref.h5ad"),
                          celltype_key="cell_type", projection_dim=16, mlp_hidden=[16], top_k=5,
                          histology_pretrain_epochs=1, histology_neighbours=4,
                          train={"epochs": 30, "batch_size": 64, "patience": 30})
    carhe.panel = GenePanel(genes=GENES)
    log = carhe.fit(train)
    record = log.selection["celltypes"]
    assert record["source"] == "reference" and record["types"] == sorted(TYPES)
    assert record["reference"] == str(reference.resolve()) and len(record["genes"]) == 60
    predicted = carhe.predict(test).extras["reference_celltypes"]
    assert predicted.shape == (60, 4) and np.allclose(predicted.sum(1), 1.0, atol=1e-5)
    r = pearson_per_gene(predicted, truth[180:][:, [TYPES.index(t) for t in record["types"]]])
    assert np.mean(r) > 0.5, r
