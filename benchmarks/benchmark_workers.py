"""Wall time of ``he2st benchmark`` run serially and on a local process pool, on a synthetic work folder.

Builds (once, under ``--root``) a prepared and embedded work folder of ``--patients`` patients with two
legacy-ST sections each (``--side`` x ``--side`` spots per section, 100 genes, embedded by the tiny
``test_vit``), then benchmarks ``--methods`` (knn and ridge_cv) leave one patient out (one fold per patient, reliability
estimated on inner folds) twice with every task recomputed (``resume=false``): ``engine=serial``, then
``engine=local`` with ``--workers`` processes (longest tasks first; ``--fold-order`` also runs the pool with
the tasks in fold order, to measure what that ordering gains). Prints the wall times, the ratios, whether the
summary.csv files are identical and the machine's load (other jobs slow every run), e.g.

    python benchmarks/benchmark_workers.py --root /tmp/bw --patients 4 --workers 2 [--methods bleep,mlp --side 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic section builders

GENES = [f"G{i}" for i in range(100)]


def workspace(root: Path, patients: int, side: int):
    """``(work dir, embed config)`` of ``patients`` patients x two sections, prepared and embedded once."""
    import torch
    from synthetic import write_st_section

    from he2st.data.embeddings import EmbedConfig
    from he2st.data.patches import PatchSpec
    from he2st.data.workspace import Workspace
    from he2st.encoders import create
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.embed import embed_workspace
    from he2st.workflows.prepare import prepare

    work, weights = root / "work", root / "test_vit.pth"
    embed = EmbedConfig(encoder="test_vit", weights=weights, num_workers=0)
    if (work / "folds").exists():
        return work, embed
    sources = []
    for p in range(patients):
        for s in range(2):
            sid, seed = f"P{p}S{s}", 2 * p + s
            files = write_st_section(root / "raw" / sid, n_rows=side, n_cols=side, pitch_px=200, genes=GENES,
                                     seed=seed)
            sources.append({"reader": "st", "sample_id": sid, "patient_id": f"P{p}", "path": files["counts"],
                            "spots_file": files["spots"], "image": files["image"]})
    prepare(PrepareConfig(work_dir=work, data={"dataset": None, "samples": sources}))
    torch.manual_seed(0)
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), weights)
    embed_workspace(Workspace(work), Workspace(work).sample_ids(), PatchSpec(), embed)
    return work, embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="folder for the synthetic work folder (reused)")
    ap.add_argument("--patients", type=int, default=4, help="patients (folds), two sections each")
    ap.add_argument("--side", type=int, default=10, help="spots per section side")
    ap.add_argument("--workers", type=int, default=2, help="processes of the local engine")
    ap.add_argument("--methods", default="knn,ridge_cv", help="comma-separated methods benchmarked")
    ap.add_argument("--fold-order", action="store_true", help="also run the pool with the tasks in fold order")
    args = ap.parse_args()

    from he2st.workflows import benchmark
    from he2st.workflows.benchmark import run_benchmark
    from he2st.workflows.config import BenchmarkConfig

    work, embed = workspace(args.root, args.patients, args.side)
    common = {"work_dir": work, "embed": embed, "genes": {"n_genes": 50, "min_spot_fraction": 0.0}, "n_top": 10,
              "methods": args.methods.split(","), "transcriptome_threshold": None, "tls": False, "resume": False}
    seconds = {}
    runs = ["serial", "local"] + (["local_fold_order"] if args.fold_order else [])
    longest_first = benchmark.longest_first
    for run in runs:
        engine = run.removesuffix("_fold_order")
        benchmark.longest_first = (lambda tasks, _: tasks) if run.endswith("fold_order") else longest_first
        config = BenchmarkConfig(**common, name=f"workers_{run}", engine=engine, workers=args.workers)
        start = time.perf_counter()
        outcome = run_benchmark(config)
        seconds[run] = time.perf_counter() - start
        print(f"run={run} workers={args.workers if engine == 'local' else 1} tasks={len(outcome.runs)} "
              f"seconds={seconds[run]:.1f}", flush=True)
    summary = {run: (work / "runs" / f"workers_{run}" / "summary.csv").read_bytes() for run in runs}
    print(f"cores={os.cpu_count()} load_average_1min={os.getloadavg()[0]:.1f} "
          + " ".join(f"ratio_serial_over_{run}={seconds['serial'] / seconds[run]:.2f}" for run in runs[1:])
          + f" summary_identical={len(set(summary.values())) == 1}")


if __name__ == "__main__":
    main()
