"""Retrieval from a reference bank at scale: a bank of 10,000 vs N synthetic spots, exact vs approximate
search, side by side in one run.

Each bank is written as ``he2st train`` writes one (``ReferenceBank.save``, its approximate index
included) and each row is measured in a fresh process that loads it (``ReferenceBank.load``: big
arrays memory-mapped, small ones read) and predicts the same query spots of other slides in chunks of 512, as
whole-slide prediction does (k=50, pooled top-k, one thread). Columns: query spots/s; peak RSS of the
process; ``load s``: reading the stored index (building it, for a bank below ``APPROXIMATE_MIN_ROWS``,
whose file stores none); ``own MB``: its private memory (RssAnon) once the queries ran, less that before loading the bank
-- what the bank costs a worker, the rest of RSS being pages of the bank file that every worker on the
machine shares; recall@k of the approximate neighbours against the exact ones, and the mean absolute
difference of the predictions relative to the mean expression. Ratios compare N with 10,000 rows and
approximate with exact. Two more rows for the big bank: ``per-sample``, each slide's own exact top-k averaged
over the slides (``per_sample=True``, the default of ``bleep`` and ``knn``), and one that reads the big bank into memory instead of mapping it (``read``, what
a bank below ``MMAP_MIN_BYTES`` gets).

Synthetic spots: 40 cell states in a 16-d latent space, each spot a state plus its own variation, each
slide of 2,000 spots shifted as a batch effect; 256-d embeddings and 250 genes derived from the latent.

    python benchmarks/bank_scale.py                   # 10,000 vs 200,000 spots (under 2 minutes on 2 cores)
    python benchmarks/bank_scale.py --n 2000000       # HEST-1k scale (about 6 GB of disk, 10 GB of memory to write)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STATES, LATENT, SLIDE_SPOTS = 40, 16, 2000
CHUNK = 512


def synthetic(n: int, dim: int, genes: int, seed: int, first_slide: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` spots: embeddings (n, dim), expression (n, genes) and slide ids, all from one latent cell state
    (made in blocks, so that a 2-million-spot bank needs little more memory than its float32 arrays)."""
    world = np.random.default_rng(12345)  # the same cell states and maps for banks and queries
    centres = world.normal(scale=2.0, size=(STATES, LATENT))
    to_embedding = (world.normal(size=(LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
    to_expression = world.normal(scale=0.5, size=(LATENT, genes)).astype(np.float32)
    rng = np.random.default_rng(seed)
    slide = np.arange(n) // SLIDE_SPOTS
    shift = rng.normal(scale=0.5, size=(slide.max() + 1, LATENT))
    latent = (centres[rng.integers(0, STATES, n)] + rng.normal(size=(n, LATENT)) + shift[slide]).astype(np.float32)
    embeddings, expression = np.empty((n, dim), np.float32), np.empty((n, genes), np.float32)
    for a in range(0, n, 100_000):
        block = latent[a : a + 100_000]
        noise = rng.standard_normal((len(block), dim), dtype=np.float32)
        embeddings[a : a + 100_000] = block @ to_embedding + 0.3 * noise
        expression[a : a + 100_000] = np.logaddexp(0, block @ to_expression)
    return embeddings, expression, [f"S{first_slide + s}" for s in slide]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(bank_file: Path, search: str, queries: int, out: Path, threads: int, read: bool) -> None:
    """One row, in this (fresh) process: load the bank (``read``: into memory, else memory-mapped), predict
    the queries, write figures and results to ``out``."""
    import torch

    from he2st.methods.layers import ann
    from he2st.methods.layers import bank as bank_module
    from he2st.methods.layers.bank import ReferenceBank

    if read:
        bank_module.MMAP_MIN_BYTES = 1 << 62
    torch.set_num_threads(threads)
    if ann.faiss_module() is not None:
        ann.faiss_module().omp_set_num_threads(threads)
    spec = json.loads(bank_file.with_suffix(".json").read_text())
    q, _, _ = synthetic(queries, spec["dim"], spec["genes"], seed=10**6, first_slide=10**6)
    own_before = _status_mb("RssAnon")
    bank = ReferenceBank.load(bank_file)
    start = time.perf_counter()
    if search == "approximate":
        bank.approximate_index()  # the stored index, read once per worker: timed as loading
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    per_sample = search == "per-sample"  # each slide's own exact top-k, averaged (bleep's and knn's default)
    backend = "exact" if per_sample else search
    parts = [bank.predict(q[a : a + CHUNK], k=50, weighting="average", backend=backend, per_sample=per_sample)
             for a in range(0, queries, CHUNK)]
    seconds = time.perf_counter() - start
    np.savez(out, indices=np.concatenate([p.indices for p in parts]),
             expression=np.concatenate([p.expression for p in parts]),
             mean_expression=np.asarray(bank.expression[:: max(1, len(bank) // 10_000)]).mean())
    out.with_suffix(".json").write_text(json.dumps({
        "spots_per_s": queries / seconds, "load_s": loaded,
        "storage": "mapped" if isinstance(bank.expression, np.memmap) else "read", "peak_rss_mb": _status_mb("VmHWM"),
        "own_mb": _status_mb("RssAnon") - own_before}))


def write_bank(folder: Path, n: int, dim: int, genes: int) -> tuple[Path, float]:
    """The bank file of ``n`` synthetic spots and the seconds ``save`` took (the index is built there)."""
    from he2st.methods.layers.bank import ReferenceBank

    emb, expr, slides = synthetic(n, dim, genes, seed=n)
    bank = ReferenceBank(emb, expr, [f"G{i}" for i in range(genes)], slides)
    del emb
    path = folder / f"bank_{n}.h5"
    start = time.perf_counter()
    bank.save(path)
    path.with_suffix(".json").write_text(json.dumps({"dim": dim, "genes": genes}))
    return path, time.perf_counter() - start


def run_row(bank_file: Path, search: str, args: argparse.Namespace, folder: Path, storage: str) -> dict:
    out = folder / f"{bank_file.stem}_{search}_{storage}.npz"
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, __file__, "--measure", str(bank_file), "--search", search, "--queries",
                    str(args.queries), "--out", str(out), "--threads", str(args.threads)]
                   + ["--read"] * (storage == "read"), check=True, env=env)
    return json.loads(out.with_suffix(".json").read_text()) | dict(np.load(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="spots of the big bank (the small one has 10,000)")
    ap.add_argument("--queries", type=int, default=2048, help="query spots predicted per row")
    ap.add_argument("--dim", type=int, default=256, help="embedding width")
    ap.add_argument("--genes", type=int, default=250, help="genes of the bank's expression")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the bank files (default: a temporary one)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--search", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--read", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure, args.search, args.queries, args.out, args.threads, args.read)
        return
    from he2st.methods.layers import ann

    if ann.faiss_module() is None:
        sys.exit("faiss is not installed: pip install 'he2st[ann]'")
    ann.faiss_module().omp_set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bank_scale_", dir=args.dir))
    rows, save_s = {}, {}
    try:
        for n in (10_000, args.n):
            bank_file, save_s[n] = write_bank(folder, n, args.dim, args.genes)
            big = (("exact", "read"), ("per-sample", "mapped")) if n > 10_000 else ()
            for search, storage in (("exact", "mapped"), ("approximate", "mapped")) + big:
                rows[n, search, storage] = run_row(bank_file, search, args, folder, storage)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"bank rows | search      | storage | query spots/s | peak RSS MB | own MB | load s | recall@50 | pred. diff"
          f"   (dim {args.dim}, {args.genes} genes, {args.queries} queries, {args.threads} thread(s))")
    for (n, search, storage), r in rows.items():
        exact = rows[n, "exact", "mapped"]
        if search == "per-sample":  # another predictor: neither recall nor difference applies
            recall = diff = "-"
        else:
            recall = f"{np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(r['indices'], exact['indices'])]):.4f}"
            diff = f"{np.abs(r['expression'] - exact['expression']).mean() / float(exact['mean_expression']):.4f}"
        print(f"{n:>9,} | {search:<11} | {r['storage']:<7} | {r['spots_per_s']:13.1f} | {r['peak_rss_mb']:11.0f} | "
              f"{r['own_mb']:6.0f} | {r['load_s']:6.2f} | {recall:>9} | {diff:>10}")
    for search in ("exact", "approximate"):
        small, big = rows[10_000, search, "mapped"], rows[args.n, search, "mapped"]
        print(f"ratio {args.n:,} / 10,000 rows, {search}: throughput x{big['spots_per_s'] / small['spots_per_s']:.3f}, "
              f"peak RSS x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}")
    for n in (10_000, args.n):
        approximate, exact = rows[n, "approximate", "mapped"], rows[n, "exact", "mapped"]
        print(f"ratio approximate / exact at {n:,} rows: throughput x{approximate['spots_per_s'] / exact['spots_per_s']:.2f}")
    print(f"bank written, approximate index built, in {save_s[args.n]:.1f} s at {args.n:,} rows")


if __name__ == "__main__":
    main()
