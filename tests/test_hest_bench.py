"""``he2st hest-bench`` and ``he2st data export-hest`` on synthetic folders in HEST-Benchmark's layout.

The ``hest-ridge`` row is checked against a re-computation written here from HEST's published code
(mahmoodlab/HEST ``src/hest/bench/benchmark.py`` ``predict_single_split``, ``trainer.py`` ``train_test_reg``,
``st_dataset.py`` ``load_adata``), using none of he2st's code: same split files, same genes, same numbers.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from he2st.io import MARKER
from in_process import run_cli
from synthetic import embedded_sections, prepared_sections

N_SPOTS = 100
GRID = 14  # block grid of the synthetic patches: 14 x 14 blocks of 16 px = 224 px
ALL_GENES = [f"G{i:02d}" for i in range(60)]
TASK_GENES = ALL_GENES[::-1][5:55]  # 50 genes, not in the files' column order


@functools.lru_cache(maxsize=16)
def block_features(patch_file: Path) -> tuple[np.ndarray, list[str]]:
    """Each patch's 16 x 16 block means (588 numbers): the test's stand-in for an encoder (read once per file)."""
    with h5py.File(patch_file, "r") as fh:
        img = fh["img"][:].astype(np.float32)
        barcodes = [b.decode() for b in fh["barcode"][:].reshape(-1)]
    n = len(img)
    blocks = img.reshape(n, GRID, 16, GRID, 16, 3).mean(axis=(2, 4))
    return blocks.reshape(n, -1), barcodes


def write_task(root: Path, n_samples: int = 4, seed: int = 0) -> Path:
    """A task folder as HEST publishes one: patches/*.h5, adata/*.h5ad, splits/, var_50genes.json. Patch
    colours and counts share a per-spot latent, so there is something to predict; the expression files
    list spots in another order than the patch files (HEST selects them by barcode)."""
    rng = np.random.default_rng(seed)
    colour_map = rng.normal(size=(3, GRID * GRID * 3)) * 25
    gene_map = rng.normal(size=(3, len(ALL_GENES))) * 0.6
    ids = [f"S{i}" for i in range(n_samples)]
    for sid in ids:
        latent = rng.normal(size=(N_SPOTS, 3))
        blocks = np.clip(140 + latent @ colour_map + rng.normal(0, 10, (N_SPOTS, GRID * GRID * 3)), 0, 255)
        img = np.kron(blocks.reshape(N_SPOTS, GRID, GRID, 3), np.ones((1, 16, 16, 1))).astype(np.uint8)
        barcodes = [f"{sid}-{j:04d}" for j in range(N_SPOTS)]
        (root / "patches").mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as fh:
            fh.create_dataset("img", data=img, compression="lzf", chunks=(8, 224, 224, 3))
            fh.create_dataset("barcode", data=np.array([[b.encode()] for b in barcodes]))
            fh.create_dataset("coords", data=rng.integers(0, 5000, (N_SPOTS, 2)))
        counts = rng.poisson(np.exp(latent @ gene_map + 1.0)).astype(np.float32)
        order = rng.permutation(N_SPOTS)
        (root / "adata").mkdir(exist_ok=True)
        ad.AnnData(X=counts[order], obs=pd.DataFrame(index=[barcodes[j] for j in order]),
                   var=pd.DataFrame(index=ALL_GENES)).write_h5ad(root / "adata" / f"{sid}.h5ad")
    (root / "splits").mkdir()
    for i, test in enumerate(ids[:2]):  # two splits, each holding out one sample
        for kind, members in (("train", [s for s in ids if s != test]), ("test", [test])):
            pd.DataFrame({"sample_id": members, "patches_path": [f"patches/{s}.h5" for s in members],
                          "expr_path": [f"adata/{s}.h5ad" for s in members]}).to_csv(
                root / "splits" / f"{kind}_{i}.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": TASK_GENES}))
    return root


def hest_reference(task_dir: Path, seed: int = 1) -> list[float]:
    """HEST's split scores, recomputed from its published code path (no he2st imports)."""
    import torch
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    genes = json.loads((task_dir / "var_50genes.json").read_text())["genes"]
    n_splits = len([f for f in os.listdir(task_dir / "splits") if f != MARKER]) // 2
    scores = []
    for i in range(n_splits):
        assets = {}
        for key in ("train", "test"):
            table = pd.read_csv(task_dir / "splits" / f"{key}_{i}.csv")
            xs, ys = [], []
            for row in table.itertuples():
                emb, barcodes = block_features(task_dir / row.patches_path)
                adata = ad.read_h5ad(task_dir / row.expr_path)[barcodes][:, genes]
                ys.append(np.log1p(adata.to_df().to_numpy().astype(np.float64)))  # normalize=True: log1p
                xs.append(emb)
            assets[key] = np.concatenate(xs), np.concatenate(ys)
        (x_train, y_train), (x_test, y_test) = assets["train"], assets["test"]
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=256, random_state=seed))])
        x_train, x_test = torch.Tensor(pipe.fit_transform(x_train)), torch.Tensor(pipe.transform(x_test))
        reg = Ridge(solver="lsqr", alpha=100 / (x_train.shape[1] * y_train.shape[1]), random_state=seed,
                    fit_intercept=False, max_iter=1000)
        reg.fit(x_train, y_train)
        preds = reg.predict(x_test)
        scores.append(float(np.mean([pearsonr(y_test[:, g], preds[:, g])[0] for g in range(y_test.shape[1])])))
    return scores


def test_hest_ridge_row_matches_hests_protocol(tmp_path: Path, one_torch_thread) -> None:
    from he2st.workflows.hest_bench import HestBenchConfig, run_hest_bench

    bench = tmp_path / "bench"
    write_task(bench / "IDC")
    out = tmp_path / "results"
    config = HestBenchConfig(bench_dir=bench, methods=["ridge", "knn"], out=out)
    outcome = run_hest_bench(config, features=lambda task: lambda sample: block_features(sample.patches))
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["task", "split", "method", "score_hest", "score_per_sample"]
    assert sorted(set(table.method)) == ["hest-ridge", "knn", "ridge"]
    probe = table[table.method == "hest-ridge"].sort_values("split")
    expected = hest_reference(bench / "IDC")
    assert len(expected) == 2 and min(expected) > 0.3  # the synthetic signal is learnt
    np.testing.assert_allclose(probe.score_hest.to_numpy(), expected, rtol=0, atol=1e-6)
    assert all(r["pca_components"] == 256 for r in outcome.rows if r["method"] == "hest-ridge")
    assert not outcome.notes and not outcome.failures
    # one test sample per split: he2st's per-sample score is then the same number
    np.testing.assert_allclose(table.score_hest, table.score_per_sample, atol=1e-5)
    doc = json.loads((out / "results.json").read_text())
    summary = {(r["task"], r["method"]): r for r in doc["summary"]}
    assert summary[("IDC", "hest-ridge")]["score_hest_mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert summary[("IDC", "hest-ridge")]["score_hest_sd"] == pytest.approx(np.std(expected), abs=1e-6)
    assert "| IDC |" in (out / "results.md").read_text()
    # the folder is now he2st's: a second run may write into it; a stranger's folder is refused
    run_hest_bench(config.model_copy(update={"methods": []}),
                   features=lambda task: lambda sample: block_features(sample.patches))
    stranger = tmp_path / "theirs"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    bad = run_cli("hest-bench", "--bench-dir", bench, "--out", stranger, "--methods", "ridge")
    assert bad.returncode == 2 and "refusing" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bad_layout_is_one_line_naming_the_file(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    task = bench / "PRAD"
    (task / "splits").mkdir(parents=True)
    pd.DataFrame({"sample_id": ["a"], "patches_path": ["p.h5"]}).to_csv(task / "splits" / "train_0.csv", index=False)
    res = run_cli("hest-bench", "--bench-dir", bench, "--out", tmp_path / "out")
    assert res.returncode == 2 and "var_50genes.json" in res.stderr and "gene list not found" in res.stderr
    (task / "var_50genes.json").write_text(json.dumps({"genes": ["G1"]}))
    res = run_cli("hest-bench", "--bench-dir", bench, "--out", tmp_path / "out")
    assert res.returncode == 2 and "train_0.csv has no test_0.csv" in res.stderr
    pd.DataFrame({"sample_id": ["b"], "patches_path": ["p.h5"]}).to_csv(task / "splits" / "test_0.csv", index=False)
    res = run_cli("hest-bench", "--bench-dir", bench, "--out", tmp_path / "out")
    assert res.returncode == 2 and "train_0.csv" in res.stderr and "expr_path" in res.stderr
    res = run_cli("hest-bench", "--bench-dir", bench, "--tasks", "IDC", "--out", tmp_path / "out")
    assert res.returncode == 2 and "'IDC'" in res.stderr and "PRAD" in res.stderr
    assert all(len(r.strip().splitlines()) == 1 for r in [res.stderr])


def test_a_refused_re_export_keeps_the_old_export_and_a_split_file_of_the_users(tmp_path: Path) -> None:
    """A re-export refused for bad input (a patch cache gone) leaves the earlier export whole, its splits
    included; a file of the user's in splits/ is refused in one line naming it, never deleted."""
    work = prepared_sections(tmp_path, {"S1": "P0", "S2": "P1", "S3": "P2"}, [f"G{i}" for i in range(20)])
    bench = tmp_path / "bench"
    export = ("data", "export-hest", "-w", work, "-o", bench, "--task", "MINE", "--n-genes", "10")
    assert run_cli(*export).returncode == 0
    splits = bench / "MINE" / "splits"
    before = {p.name: p.read_bytes() for p in splits.iterdir()}
    mine = splits / "my_split.csv"
    mine.write_text("sample_id,patches_path,expr_path\n")
    res = run_cli(*export)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "my_split.csv" in res.stderr
    assert mine.read_text() == "sample_id,patches_path,expr_path\n"
    mine.unlink()
    from he2st.data.patches import PatchSpec
    from he2st.data.workspace import Workspace

    cache = Workspace(work).patch_path("S3", PatchSpec())
    cache.rename(tmp_path / cache.name)
    res = run_cli(*export)
    assert res.returncode == 2 and cache.name in res.stderr
    assert {p.name: p.read_bytes() for p in splits.iterdir()} == before


def test_export_then_benchmark_a_work_folder(tmp_path: Path, one_torch_thread) -> None:
    genes = [f"G{i}" for i in range(20)]
    work, embed = embedded_sections(tmp_path, {"S1": "P0", "S2": "P1", "S3": "P1", "S4": "P2"}, genes)
    bench = tmp_path / "bench"
    res = run_cli("data", "export-hest", "-w", work, "-o", bench, "--task", "MINE", "--n-genes", "10")
    assert res.returncode == 0, res.stderr
    task = bench / "MINE"
    assert sorted(p.name for p in (task / "splits").iterdir() if p.name != MARKER) == [
        "test_0.csv", "test_1.csv", "test_2.csv", "train_0.csv", "train_1.csv", "train_2.csv"]
    test_1 = pd.read_csv(task / "splits" / "test_1.csv")
    assert list(test_1.sample_id) == ["S2", "S3"] and set(test_1.patient_id) == {"P1"}  # patient P1 held out
    assert "S2" not in set(pd.read_csv(task / "splits" / "train_1.csv").sample_id)
    assert len(json.loads((task / "var_50genes.json").read_text())["genes"]) == 10
    with h5py.File(task / "patches" / "S1.h5", "r") as fh:
        assert fh["img"].shape == (25, 224, 224, 3) and fh["barcode"].shape == (25, 1)
        assert fh["coords"].shape == (25, 2)
    assert ad.read_h5ad(task / "adata" / "S1.h5ad").n_vars == 20  # every gene, raw counts
    # a re-export replaces its own folder
    assert run_cli("data", "export-hest", "-w", work, "-o", bench, "--task", "MINE", "--n-genes", "10").returncode == 0

    out = tmp_path / "results"
    res = run_cli("hest-bench", "--bench-dir", bench, "--methods", "ridge", "--encoder", "test_vit",
                  "--weights", embed.weights, "--out", out, "--set", "embed.runtime=torch",
                  "--set", "embed.num_workers=0")
    assert res.returncode == 0, res.stderr
    assert "PCA components" in res.stderr  # 50-75 training spots: PCA cut below 256, and said so
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 6 and set(table.method) == {"hest-ridge", "ridge"}
    assert table.score_hest.notna().all()
    assert len(list((out / "cache").rglob("*.h5"))) == 4
    again = run_cli("hest-bench", "--bench-dir", bench, "--methods", "ridge", "--encoder", "test_vit",
                    "--weights", embed.weights, "--out", out, "--set", "embed.runtime=torch")
    assert "0 patches embedded" in again.stdout  # the cache is reused
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)


def test_the_task_average_is_over_every_task_as_hests_np_mean() -> None:
    """A method NaN on one task, or skipped on it, averages to NaN (HEST's ``np.mean``), never to the mean of
    the tasks it has, which would sit beside the other methods' averages over all tasks."""
    from he2st.evaluate.hest_results import summarise_splits, task_average

    def row(task: str, method: str, score: float) -> dict:
        return {"task": task, "split": 0, "method": method, "score_hest": score, "score_per_sample": score}

    rows = [row("A", "hest-ridge", 0.2), row("B", "hest-ridge", 0.3), row("A", "nan", 0.5),
            row("B", "nan", float("nan")), row("A", "skipped", 0.5)]
    average = task_average(summarise_splits(rows))
    assert average["hest-ridge"]["score_hest"] == pytest.approx(0.25)
    assert np.isnan(average["nan"]["score_hest"]) and np.isnan(average["skipped"]["score_per_sample"])


def test_a_split_with_a_patient_on_both_sides_is_refused(tmp_path: Path) -> None:
    """Split files may name each sample's patient (HEST's reader ignores the column, he2st draws validation by
    it); a split holding one patient's samples on both sides would inflate every score, so it is refused."""
    from he2st.data.hest_layout import read_task
    from he2st.errors import He2stError

    task = write_task(tmp_path / "PRAD")
    for kind in ("train", "test"):
        table = pd.read_csv(task / "splits" / f"{kind}_1.csv")
        table["patient_id"] = ["P0" if s in ("S0", "S1") else s for s in table["sample_id"]]
        table.to_csv(task / "splits" / f"{kind}_1.csv", index=False)
    with pytest.raises(He2stError, match=r"patient\(s\) \['P0'\] have samples in both train_1.csv and test_1.csv"):
        read_task(task)
