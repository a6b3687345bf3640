"""``he2st benchmark`` stores each finished (fold, row) in the run folder: a run killed part way and run
again reuses what was done and gives the numbers of an uninterrupted run; a changed setting recomputes
the rows it touches; a process pool gives the numbers of a serial run. On three synthetic sections of
three patients (leave one patient out: three folds), with knn (a bank method, so TLS is scored too) and
ridge_cv."""

from __future__ import annotations

import json
import os
import pickle

import anndata as ad
import numpy as np
import pytest
from in_process import run_cli
from synthetic import embedded_with_signature

from he2st.data.splits import Fold
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.io import overwriting
from he2st.workflows import benchmark_tasks
from he2st.workflows.benchmark import longest_first, run_benchmark
from he2st.workflows.benchmark_tasks import BenchmarkTask
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.task_store import NOT_RESULTS, TaskStore, run_settings, task_key, task_settings

GENES = [f"G{i}" for i in range(60)]
OPTIONS = {"knn": {"top_k": 5}, "ridge_cv": {"pca_components": 8}}
RUN_FOLD = benchmark_tasks.run_fold


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """``(work dir, embed config, TLS signature)``: three prepared, embedded sections of three patients."""
    return embedded_with_signature(tmp_path_factory.mktemp("resume"), {"S1": "P1", "S2": "P2", "S3": "P3"}, GENES,
                                   "G0\t1.0\nG1\t0.5\nG7\t-0.2\nintercept\t0.1\n")


def config(work, name: str, **changes) -> BenchmarkConfig:
    path, embed, signature = work
    return BenchmarkConfig(**{"work_dir": path, "embed": embed, "genes": {"n_genes": 50, "min_spot_fraction": 0.0},
                              "n_top": 5, "name": name, "methods": ["knn", "ridge_cv"], "method_options": OPTIONS,
                              "transcriptome_threshold": None, "tls_model": str(signature)} | changes)


def fits(monkeypatch, stop_after: int | None = None) -> list[tuple[str, str]]:
    """The (method, fold) of every fit from here on; with ``stop_after``, the run is killed (an interrupt, as
    Ctrl-C or a lost job) when that many fits have ended."""
    seen: list[tuple[str, str]] = []

    def counted(name, data, cfg, options=None):
        if stop_after is not None and len(seen) >= stop_after:
            raise KeyboardInterrupt
        seen.append((name, data.fold.name))
        return RUN_FOLD(name, data, cfg, options)

    monkeypatch.setattr(benchmark_tasks, "run_fold", counted)
    return seen


def files(outcome) -> dict[str, object]:
    """What must not change between equivalent runs: summary.csv and per_gene.csv as bytes, the folds'
    scores and the TLS part of results.json."""
    document = json.loads(outcome.paths["json"].read_text())
    return {"summary": outcome.paths["summary"].read_bytes(), "per_gene": outcome.paths["per_gene"].read_bytes(),
            "folds": document["folds"], "tls": document["tls"]}


def task_records(outcome) -> dict[str, dict]:
    return json.loads(outcome.paths["json"].read_text())["provenance"]["tasks"]


def test_a_killed_run_resumes_with_the_numbers_of_an_uninterrupted_one(work, monkeypatch):
    whole = run_benchmark(config(work, "whole"))
    assert whole.tls.scores and not whole.tls.failures  # TLS scored (knn has a bank): its scores are stored too

    first_fold = Workspace(work[0]).load_folds("lopo")[0][0].name
    fits(monkeypatch, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config(work, "cut"))
    run = work[0] / "runs" / "cut"
    assert (run / "tasks" / first_fold / "knn.pkl").is_file() and not (run / "results.json").exists()
    assert not (run / "tasks" / first_fold / "ridge_cv.pkl").exists()

    done = fits(monkeypatch)
    lines: list[str] = []
    resumed = run_benchmark(config(work, "cut"), log=lines.append)
    assert ("knn", first_fold) not in done and len(done) == 5  # the finished task is reused, the rest fitted
    assert [line.split()[:2] for line in lines if line.endswith("(reused)")] == [[first_fold, "knn"]]
    assert files(resumed) == files(whole)
    records = task_records(resumed)
    assert [key for key, r in records.items() if r["reused"]] == [f"knn/{first_fold}"]
    assert {r["pid"] for r in records.values()} == {os.getpid()}  # serial: every task ran in this process

    # a changed option of one method recomputes that method's rows only
    done = fits(monkeypatch)
    run_benchmark(config(work, "cut", method_options=OPTIONS | {"knn": {"top_k": 3}}))
    assert sorted(m for m, _ in done) == ["knn"] * 3
    # where and by how many processes a run is scheduled changes nothing but the threads each task computes
    # with: a pool at one thread a task reuses every task of a serial run at one thread, and starts no pool
    options = OPTIONS | {"knn": {"top_k": 3}}
    run_benchmark(config(work, "cut", method_options=options, task_threads=1))
    done = fits(monkeypatch)
    again = run_benchmark(config(work, "cut", method_options=options, engine="local", workers=2, task_threads=1))
    assert done == [] and all(r["reused"] for r in task_records(again).values())
    # resume=false recomputes every task
    done = fits(monkeypatch)
    fresh = run_benchmark(config(work, "cut", resume=False))
    assert len(done) == 6 and files(fresh) == files(whole)


def test_the_command_says_which_tasks_it_reused(work):
    path, embed, _ = work
    args = ["benchmark", "-w", path, "--methods", "knn", "--name", "cli", "--set", "embed.encoder=test_vit",
            "--set", f"embed.weights={embed.weights}", "--set", "embed.num_workers=0", "--set", "n_top=5",
            "--set", "genes.n_genes=50", "--set", "genes.min_spot_fraction=0", "--set", "transcriptome_threshold=null",
            "--set", "tls=false"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("(reused)") == 3 and first.stdout.count("(reused)") == 0
    assert (path / "runs" / "cli" / "summary.csv").read_text()
    third = run_cli(*args, "--no-resume")
    assert third.returncode == 0 and third.stdout.count("(reused)") == 0


def test_a_task_file_he2st_did_not_write_is_refused_and_never_read(work):
    cfg = config(work, "foreign", tls=False)
    fold = Workspace(work[0]).load_folds("lopo")[0][0]
    planted = TaskStore(work[0] / "runs" / "foreign").path(fold.name, "knn")
    planted.parent.mkdir(parents=True)
    planted.write_bytes(pickle.dumps("not he2st's"))
    with pytest.raises(He2stError, match="not written by he2st.*--overwrite"):
        run_benchmark(cfg)
    with overwriting():
        outcome = run_benchmark(cfg)  # replaced, not read: every task is fitted
    assert not any(r["reused"] for r in task_records(outcome).values())
    assert TaskStore(planted.parents[2]).load(fold.name, "knn", task_records(outcome)[f"knn/{fold.name}"]["key"])


def test_the_key_holds_what_changes_a_tasks_numbers_and_nothing_else(work):
    fold = Workspace(work[0]).load_folds("lopo")[0][0]
    patients = {"S1": "P1", "S2": "P2", "S3": "P3"}
    sums = {"samples/S1.h5ad": "a"}

    def key(cfg: BenchmarkConfig, label: str = "ridge_cv", checksums=None, tls: str | None = None,
            method: str | None = None) -> str:
        return task_key(task_settings(run_settings(cfg), cfg, label, method or label, {}), fold, patients, checksums or sums, tls)

    base = config(work, "a")
    same = [config(work, "b"), config(work, "a", resume=False),
            config(work, "a", methods=["ridge_cv", "mlp"]),  # another row: not this one's business
            config(work, "a", method_options=OPTIONS | {"knn": {"top_k": 9}}),
            config(work, "a", work_dir=work[0].parent / "elsewhere")]
    assert {key(c) for c in same} == {key(base)}
    assert key(config(work, "a", seeds=3)) == key(base)  # ridge_cv does not depend on its seed
    assert key(config(work, "a", seeds=3), "mlp") != key(base, "mlp")  # mlp does
    changed = [key(config(work, "a", method_options=OPTIONS | {"ridge_cv": {"pca_components": 4}})),
               key(config(work, "a", n_top=10)), key(config(work, "a", seed=1)),
               key(config(work, "a", genes={"n_genes": 40, "min_spot_fraction": 0.0})),
               key(base, checksums={"samples/S1.h5ad": "b"}), key(base, tls="model digest")]
    assert len(set(changed) | {key(base)}) == len(changed) + 1
    assert set(NOT_RESULTS) <= set(BenchmarkConfig.model_fields)
    # the engine and its workers enter through the threads each task computes with (sums, lsqr's iterates)
    one = key(config(work, "a", task_threads=1))
    assert one == key(config(work, "a", engine="local", workers=64)) == key(config(work, "a", engine="ray",
                                                                                    task_threads=1))
    assert one != key(config(work, "a", task_threads=2))


def test_the_key_reads_a_localisation_signature_file_and_the_fold_inputs_name_unlabelled_samples(work, tmp_path):
    """Rewriting a signature file in place changes the rows it scores, so the key sees its weights, not only
    its path; a sample whose images join the fit (``unlabelled``) is among the files a fold reads."""
    from he2st.workflows.benchmark import fold_inputs

    fold = Workspace(work[0]).load_folds("lopo")[0][0]
    signature = tmp_path / "sig.tsv"

    def key() -> str:
        cfg = config(work, "a", localisation=True, localisation_signature=str(signature))
        return task_key(task_settings(run_settings(cfg), cfg, "knn", "knn", {}), fold, {"S1": "P1", "S2": "P2", "S3": "P3"}, {}, None)

    signature.write_text("G0\t1.0\nG1\t1.0\n")
    first = key()
    signature.write_text("G0\t-1.0\nG5\t3.0\n")
    assert key() != first
    assert fold_inputs(config(work, "a"), Workspace(work[0]), fold) == [*fold.train, *fold.test]
    with_unlabelled = fold_inputs(config(work, "a", unlabelled=["test"]), Workspace(work[0]), fold)
    assert with_unlabelled == [*fold.train, *fold.test]  # the held-out samples are read already
    other = next(s for s in fold.train)
    assert fold_inputs(config(work, "a", unlabelled=[other]), Workspace(work[0]), fold).count(other) == 1


def test_a_pool_starts_the_longest_tasks_first(tmp_path):
    """Longest processing time first, a fold's tasks together: listed cost x training spots x seeds; the ensemble
    (no listed cost) first."""
    cfg = BenchmarkConfig(work_dir=tmp_path, methods=["knn", "mlp", "ridge_cv", "ensemble"], seeds=3)
    big, small = Fold(name="big", train=["A", "B"], test=["C"]), Fold(name="small", train=["C"], test=["A"])
    tasks = [BenchmarkTask(cfg, fold, {}, m, m, {}) for fold in (small, big) for m in cfg.methods]
    order = [(t.method, t.fold.name) for t in longest_first(tasks, {"A": 300, "B": 300, "C": 100})]
    assert order == [("ensemble", "big"), ("mlp", "big"), ("ridge_cv", "big"), ("knn", "big"),
                     ("ensemble", "small"), ("mlp", "small"), ("ridge_cv", "small"), ("knn", "small")]


@pytest.mark.slow  # two worker processes start (torch imported in each): ~20 s on a 2-core machine
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_process_pool_gives_the_numbers_of_a_serial_run(work, engine):
    if engine == "ray":
        pytest.importorskip("ray")
    serial = run_benchmark(config(work, "serial"))
    pooled = run_benchmark(config(work, "pooled", engine=engine, workers=2, resume=False))
    assert files(pooled) == files(serial)
    for label in ("knn", "ridge_cv"):
        for sid in ("S1", "S2", "S3"):
            ours = ad.read_h5ad(work[0] / "runs" / "pooled" / "predictions" / label / f"{sid}.h5ad")
            theirs = ad.read_h5ad(work[0] / "runs" / "serial" / "predictions" / label / f"{sid}.h5ad")
            np.testing.assert_array_equal(ours.X, theirs.X)
    pids = {r["pid"] for r in task_records(pooled).values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # each task ran in one of the two workers
