"""Peak memory of an end-to-end fine-tuning epoch, patches held in memory against patches read per batch.

Writes synthetic patch caches (224 px uint8, as ``he2st prepare`` writes them: ``img`` chunked 16 patches a
chunk, split over 4 samples) of each size in ``--n``, then for each size runs, each in a fresh process,
one epoch over spots whose patches are

- ``eager``: read whole from the caches into one array, every patch in memory at once;
- ``lazy``: the :class:`~he2st.data.patch_rows.PatchRows` ``load_spots`` gives, read one batch at a time.

``--loop fit`` is one epoch of BLEEP's fine-tuning (``finetune_encoder``, the tiny ``test_vit`` encoder
with random weights, 10 % of the spots for validation); ``--loop batches`` (the default) is that epoch's
data path alone: every shuffled batch of 64 training spots through
:func:`~he2st.methods.finetune.patch_batch` (read, resized and normalised for the encoder), without the
per-patch colour augmentation and the encoder's forward and backward passes, which make a real epoch
take a quarter of a second a patch on a 2-core CPU. Prints one line per size with each mode's peak resident memory
(``ru_maxrss`` of its process, MiB), its loop time, and the patches' size in memory; then each mode's
growth in peak memory from the smallest to the largest size, and the milliseconds per patch of reading
shuffled batches from the largest caches through :class:`~he2st.data.patch_rows.PatchRows` (the file's
bytes) against reading the same rows through h5py.

    python benchmarks/finetune_memory.py --n 2000,8000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

SIDE, SAMPLES, GENES, BATCH = 224, 4, 50, 64


def write_caches(root: Path, n: int) -> list[Path]:
    """``SAMPLES`` caches holding ``n`` patches between them (random pixels; their values do not matter)."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (256, SIDE, SIDE, 3), dtype=np.uint8)
    paths = []
    for s, rows in enumerate(np.array_split(np.arange(n), SAMPLES)):
        path = root / f"s{s}.h5"
        with h5py.File(path, "w") as fh:
            img = fh.create_dataset("img", shape=(len(rows), SIDE, SIDE, 3), dtype=np.uint8,
                                    chunks=(16, SIDE, SIDE, 3))
            for a in range(0, len(rows), len(block)):
                img[a : a + len(block)] = block[: len(rows) - a]
        paths.append(path)
    return paths


def one_epoch(loop: str, mode: str, paths: list[Path]) -> dict[str, float]:
    """One epoch (``loop``: ``fit`` or ``batches``) on spots whose patches are held as ``mode`` says."""
    from dataclasses import replace

    import torch

    from he2st.data.genes import GenePanel
    from he2st.data.patch_rows import PatchRows
    from he2st.data.spots import SpotSet
    from he2st.encoders import create
    from he2st.methods import create_method
    from he2st.methods.finetune import patch_batch

    if mode == "eager":
        arrays = []
        for path in paths:
            with h5py.File(path, "r") as fh:
                arrays.append(fh["img"][:])
        patches = np.concatenate(arrays)
        del arrays
    else:
        patches = PatchRows.concat([PatchRows.from_cache(p) for p in paths])
    n = len(patches)
    rng = np.random.default_rng(0)
    spots = SpotSet(sample_ids=np.repeat([f"s{s}" for s in range(SAMPLES)], -(-n // SAMPLES))[:n].astype(object),
                    barcodes=np.arange(n).astype(str).astype(object), features=np.zeros((n, 8), np.float32),
                    coords_um=rng.uniform(0, 5000, (n, 2)), genes=[f"G{i}" for i in range(GENES)],
                    targets=rng.gamma(2.0, 1.0, (n, GENES)).astype(np.float32))
    spots = replace(spots, patches=patches)
    val = np.arange(n) % 10 == 0
    train = spots.subset(~val)
    start = time.perf_counter()
    if loop == "fit":
        method = create_method("bleep", finetune_encoder=True, encoder="test_vit", encoder_pretrained=False,
                               ensemble=1, train={"epochs": 1, "batch_size": BATCH})
        method.panel = GenePanel(genes=spots.genes)
        method.fit(train, spots.subset(val))
    else:
        encoder = create("test_vit", pretrained=False)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        for a in range(0, len(train), BATCH):
            patch_batch(encoder, train, order[a : a + BATCH], False, None)
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def read_ms_per_patch(paths: list[Path], batches: int = 16) -> tuple[float, float]:
    """Milliseconds per patch reading ``batches`` shuffled batches: through PatchRows, and row by row through h5py."""
    from he2st.data.patch_rows import PatchRows

    rows = PatchRows.concat([PatchRows.from_cache(p) for p in paths])
    order = np.random.default_rng(1).permutation(len(rows))[: batches * BATCH]
    start = time.perf_counter()
    for a in range(0, len(order), BATCH):
        rows.read(order[a : a + BATCH])
    ours = time.perf_counter() - start
    files = [h5py.File(p, "r") for p in paths]
    start = time.perf_counter()
    for a in range(0, len(order), BATCH):
        for i in np.sort(order[a : a + BATCH]):
            files[rows.which[i]]["img"][rows.rows[i]]
    hdf5 = time.perf_counter() - start
    for fh in files:
        fh.close()
    rows.close()
    return 1e3 * ours / len(order), 1e3 * hdf5 / len(order)


def measure(loop: str, mode: str, paths: list[Path]) -> dict[str, float]:
    """:func:`one_epoch` in a fresh interpreter, so its peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "--child", loop, mode, *map(str, paths)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="2000,8000", help="comma-separated numbers of patches")
    ap.add_argument("--loop", choices=("batches", "fit"), default="batches",
                    help="the epoch's data path alone, or a real fine-tuning epoch (slow without a GPU)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # loop, mode and cache files: one measured epoch
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_epoch(args.child[0], args.child[1], [Path(p) for p in args.child[2:]])))
        return
    peaks: dict[str, list[float]] = {"eager": [], "lazy": []}
    sizes = [int(v) for v in args.n.split(",")]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_caches(Path(tmp), n)
            results = {mode: measure(args.loop, mode, paths) for mode in peaks}
            if n == max(sizes):
                read_ms = read_ms_per_patch(paths)
        for mode, r in results.items():
            peaks[mode].append(r["peak_rss_mib"])
        print(f"n={n} patches_mib={n * SIDE * SIDE * 3 / 2**20:.0f} "
              + " ".join(f"{m}_peak_rss_mib={r['peak_rss_mib']:.0f} {m}_loop_s={r['seconds']:.1f}"
                         for m, r in results.items()), flush=True)
    print(" ".join(f"{m}_growth_mib={p[-1] - p[0]:.0f}" for m, p in peaks.items()))
    print(f"read_ms_per_patch patch_rows={read_ms[0]:.3f} h5py={read_ms[1]:.3f} (x{read_ms[1] / read_ms[0]:.1f})")


if __name__ == "__main__":
    main()
