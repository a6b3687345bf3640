"""Million-spot banks without million-spot costs: a fixed sample of validation spots per epoch, approximate
search above a size, big bank files memory-mapped -- checked on small data with the thresholds lowered."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO
from synthetic import linear_spots

from he2st.data.genes import GenePanel
from he2st.errors import He2stError
from he2st.methods import create_method, load_method
from he2st.methods.layers import ann
from he2st.methods.layers.bank import ReferenceBank
from he2st.stats import pearson_per_gene

sys.path.insert(0, str(REPO / "benchmarks"))
from bank_scale import synthetic  # the benchmark's spots: cell states, slide batch effects

needs_faiss = pytest.mark.skipif(ann.faiss_module() is None, reason="faiss not installed")
FAST = {"train": {"epochs": 3, "batch_size": 64, "patience": 3}, "negatives": "batch"}


def _bank(n: int = 6000, seed: int = 1) -> tuple[ReferenceBank, np.ndarray]:
    emb, expr, slides = synthetic(n, 32, 20, seed=seed)
    queries, _, _ = synthetic(300, 32, 20, seed=99, first_slide=1000)
    return ReferenceBank(emb, expr, [f"G{i}" for i in range(20)], slides), queries


# ------------------------------------------------------------------ validation
def _fit(spots, **options):
    method = create_method("bleep_faithful", **(FAST | options))
    method.panel = GenePanel(genes=spots.genes)
    scored = []  # the barcodes each epoch scores
    score = method.validation_score
    method.validation_score = lambda train, val: scored.append(val.scored.barcodes) or score(train, val)
    rows = np.arange(len(spots))
    log = method.fit(spots.subset(rows < 240), spots.subset(rows >= 240))
    return method, log, scored


def test_validation_below_the_cap_scores_every_spot_as_without_one():
    spots = linear_spots(n=300)
    capped, capped_log, scored = _fit(spots, max_validation_spots=60)
    whole, whole_log, _ = _fit(spots, max_validation_spots=None)
    assert len(scored) == 3 and all(len(b) == 60 for b in scored)  # 60 validation spots: all of them
    assert capped_log.curves == whole_log.curves
    np.testing.assert_array_equal(capped.bank.embeddings, whole.bank.embeddings)


@pytest.mark.parametrize("query_neighbours", [0, 3])
def test_validation_above_the_cap_scores_the_same_seeded_sample_every_epoch(query_neighbours):
    spots = linear_spots(n=300)
    method, _, scored = _fit(spots, max_validation_spots=25, query_neighbours=query_neighbours)
    assert len(scored) == 3 and all(np.array_equal(r, scored[0]) for r in scored)
    rows = np.arange(len(spots))
    train, val = method.contextual(spots.subset(rows < 240)), method.contextual(spots.subset(rows >= 240))
    sample = np.flatnonzero(np.isin(val.barcodes, scored[0]))
    assert len(sample) == 25 and np.array_equal(val.barcodes[sample], scored[0])
    assert np.array_equal(_fit(spots, max_validation_spots=25, query_neighbours=query_neighbours)[2][0], scored[0])
    # the sampled score is the whole sections' prediction, restricted to the sample: the sample's neighbour
    # averaging reads its neighbours among every spot of its sections, and only those are predicted with it
    method.prepare_validation(train)
    sections = method._retrieve(spots.without_expression(), method.bank).expression[rows >= 240]
    gathered = method.validation_spots(train, val, sample)
    assert len(gathered.inputs) <= 25 * (query_neighbours + 1)
    sampled = method.validation_prediction(gathered.inputs, len(gathered.scored))
    np.testing.assert_allclose(sampled, sections[sample], rtol=1e-5, atol=1e-6)
    r = np.nanmean(pearson_per_gene(sections[sample], val.targets[sample]))
    assert method.validation_pearson(train, val, sample) == pytest.approx(r, abs=1e-5)
    assert method.bank.default_search == "exact"  # rebuilt every epoch: never an index


# ------------------------------------------------------------------ approximate search
@needs_faiss
def test_approximate_search_finds_the_exact_neighbours_and_close_predictions(monkeypatch):
    monkeypatch.setattr("he2st.methods.layers.bank.APPROXIMATE_MIN_ROWS", 1000)
    bank, queries = _bank()
    exact = bank.predict(queries, k=50, backend="exact")
    approx = bank.predict(queries, k=50)  # auto: above the (lowered) size
    assert bank._index is not None
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(approx.indices, exact.indices, strict=True)])
    assert recall >= 0.95
    # the similarities are the exact cosines of the rows found, best first
    cosines = np.einsum("nd,nkd->nk", queries / np.linalg.norm(queries, axis=1, keepdims=True),
                        bank.embeddings[approx.indices])
    np.testing.assert_allclose(approx.similarities, cosines, atol=1e-5)
    assert (np.diff(approx.similarities, axis=1) <= 1e-6).all()
    relative = np.abs(approx.expression - exact.expression).mean() / exact.expression.mean()
    assert relative < 0.02
    small, _ = _bank(n=900)
    small.predict(queries, k=5)
    assert small._index is None  # below the size: exact


@needs_faiss
def test_queries_whose_probed_lists_hold_too_few_rows_are_searched_exactly():
    bank, queries = _bank(n=3000)
    k = 1500  # more than 16 lists of about 14 rows hold
    _, indices = bank.search(queries[:5], k, backend="approximate")
    _, exact_indices = bank.search(queries[:5], k, backend="exact")
    assert (indices >= 0).all()
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(exact_indices, axis=1))


def test_without_faiss_auto_searches_exactly_and_approximate_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr("he2st.methods.layers.ann.faiss_module", lambda: None)
    monkeypatch.setattr("he2st.methods.layers.bank.APPROXIMATE_MIN_ROWS", 10)
    bank, queries = _bank(n=400)
    np.testing.assert_array_equal(bank.search(queries, 4)[1], bank.search(queries, 4, backend="exact")[1])
    with pytest.raises(He2stError, match=r"he2st\[ann\]"):
        bank.search(queries, 4, backend="approximate")
    with pytest.raises(He2stError, match="unknown search"):
        ReferenceBank(bank.embeddings, bank.expression, bank.genes, search="faiss")


# ------------------------------------------------------------------ storage
@needs_faiss
def test_big_bank_file_is_memory_mapped_and_keeps_its_index(monkeypatch, tmp_path):
    monkeypatch.setattr("he2st.methods.layers.bank.APPROXIMATE_MIN_ROWS", 1000)
    monkeypatch.setattr("he2st.methods.layers.bank.MMAP_MIN_BYTES", 1)
    bank, queries = _bank()
    before = bank.predict(queries, k=50)
    path = tmp_path / "m.bank.h5"
    bank.save(path)
    monkeypatch.setattr("he2st.methods.layers.ann.build", lambda *a, **k: pytest.fail("index rebuilt"))
    loaded = ReferenceBank.load(path)
    assert isinstance(loaded.embeddings, np.memmap) and isinstance(loaded.expression, np.memmap)
    after = loaded.predict(queries, k=50)  # the stored index: the same neighbours, read rows
    np.testing.assert_array_equal(after.indices, before.indices)
    np.testing.assert_array_equal(after.expression, before.expression)
    per_sample = loaded.predict(queries, k=5, per_sample=True, backend="exact")
    np.testing.assert_allclose(per_sample.expression, bank.predict(queries, k=5, per_sample=True,
                                                                   backend="exact").expression, rtol=1e-6)
    with h5py.File(path, "r") as f:  # format version 1 plus an optional dataset: what older readers read
        assert f.attrs["format_version"] == 1 and set(f) == {"embeddings", "expression", "genes", "sample_ids",
                                                              "ivf_index"}
        assert all(f[name].chunks is None for name in ("embeddings", "expression"))


def test_small_bank_file_is_read_into_memory_and_checked(tmp_path):
    bank, _ = _bank(n=200)
    path = tmp_path / "m.bank.h5"
    bank.save(path)
    loaded = ReferenceBank.load(path)
    assert not isinstance(loaded.expression, np.memmap) and loaded._stored_index is None
    with h5py.File(path, "r") as f:
        assert "ivf_index" not in f
    np.testing.assert_array_equal(loaded.expression, bank.expression)


@needs_faiss
def test_a_model_with_a_big_bank_round_trips_through_its_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr("he2st.methods.layers.bank.APPROXIMATE_MIN_ROWS", 100)
    monkeypatch.setattr("he2st.methods.layers.bank.MMAP_MIN_BYTES", 1)
    spots = linear_spots(n=300)
    method = create_method("knn", top_k=5, per_sample=False)
    method.panel = GenePanel(genes=spots.genes)
    method.fit(spots.subset(np.arange(240)))
    test = spots.subset(np.arange(240, 300))
    before = method.predict(test).expression
    loaded = load_method(method.save(tmp_path / "knn.pt"))
    assert isinstance(loaded.bank.expression, np.memmap) and loaded.bank._stored_index is not None
    np.testing.assert_array_equal(loaded.predict(test).expression, before)


@pytest.mark.slow  # two bank sizes, four fresh processes
def test_benchmark_prints_the_rows_and_ratios():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bank_scale.py"), "--n", "12000", "--queries",
                          "256", "--dim", "32", "--genes", "20"], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    rows = [line for line in out.splitlines() if line.lstrip()[:1].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["exact", "approximate", "exact", "approximate", "exact", "per-sample"]
    assert "ratio 12,000 / 10,000 rows, exact" in out and "ratio approximate / exact at 12,000 rows" in out
