"""``benchmarks/study_scale.py``: the synthetic study it benchmarks has the sections, patients and spots asked
for, laid out as Visium spots, with expression and features the benchmark reads."""

from __future__ import annotations

import sys

import numpy as np
from conftest import REPO
from scipy.spatial import cKDTree

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.patches import PatchSpec
from he2st.data.workspace import Workspace

sys.path.insert(0, str(REPO / "benchmarks"))
from study_scale import FEATURES, PITCH_UM, build_study, section_sizes


def test_sizes_vary_and_sum_to_the_spots_asked_for():
    sizes = section_sizes(30, 100_000, seed=0)
    assert len(sizes) == 30 and sizes.sum() == 100_000
    assert sizes.max() / sizes.min() > 2  # tissue pieces of varied size, each within a capture area
    assert sizes.max() <= 78 * 64


def test_the_study_has_the_sections_patients_and_spots_asked_for(tmp_path):
    genes = [f"G{i}" for i in range(30)]
    study = build_study(tmp_path, sections=6, spots=240, genes=genes, seed=1)
    ws = Workspace(tmp_path)
    assert ws.sample_ids() == sorted(study.patients) and len(study.patients) == 6
    samples = {sid: ws.load_sample(sid) for sid in ws.sample_ids()}
    assert sorted({s.patient_id for s in samples.values()}) == ["P00", "P01"]  # three sections per patient
    assert sum(s.n_spots for s in samples.values()) == study.total == 240
    folds, _ = ws.load_folds("lopo")
    assert [f.test for f in folds] == [["S00", "S01", "S02"], ["S03", "S04", "S05"]]
    for sid, sample in samples.items():
        xy = sample.spatial * sample.pixel_size_um
        assert np.allclose(cKDTree(xy).query(xy, k=2)[0][:, 1], PITCH_UM)  # a hexagonal lattice, 100 µm apart
        counts = sample.adata.X.toarray()
        assert list(sample.adata.var_names) == genes and (counts.sum(1) > 0).all()
        for spec in (PatchSpec(), PatchSpec().context_field()):
            emb = EmbeddingFile(ws.embedding_path(EmbedConfig(), sid, spec))
            assert emb.embeddings.shape == (sample.n_spots, FEATURES)
            assert emb.barcodes == list(sample.adata.obs_names)
