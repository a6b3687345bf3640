"""Wall time of ``he2st train`` with its inner fits run serially and on a local process pool, side by side.

Trains ``--method`` (default the ensemble) on ``--samples`` of a prepared, embedded work folder, alternating
``engine=serial`` and ``engine=local`` with ``--workers`` processes ``--repeats`` times (fresh checkpoints
in a temporary folder), and prints each wall time (with the ensemble's fitting seconds per member), the
medians, their ratio, and whether the two fits chose the same members, weights and inner-fold scores
(neural members differ at the level of their threads' summation order), with the machine's load (other
jobs slow every run), e.g.

    python benchmarks/train_workers.py --work-dir W --samples B4,C2,C3,C4,C5,C6 --workers 2 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="prepared and embedded work folder")
    ap.add_argument("--samples", required=True, help="comma-separated training samples")
    ap.add_argument("--method", default="ensemble", help="method trained")
    ap.add_argument("--workers", type=int, default=2, help="processes of the local engine")
    ap.add_argument("--repeats", type=int, default=2, help="fits per engine, alternating")
    args = ap.parse_args()

    from he2st.workflows.config import TrainRunConfig
    from he2st.workflows.train import train_model

    seconds: dict[str, list[float]] = {"serial": [], "local": []}
    selections = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for engine in seconds:
                config = TrainRunConfig(work_dir=args.work_dir, method=args.method,
                                        train_samples=args.samples.split(","), engine=engine, workers=args.workers,
                                        out=Path(tmp) / f"{engine}_{repeat}.pt")
                start = time.perf_counter()
                _, log, _ = train_model(config)
                seconds[engine].append(time.perf_counter() - start)
                selections[engine] = {k: log.selection.get(k) for k in ("weights", "inner_pearson", "dropped")}
                print(f"engine={engine} repeat={repeat} seconds={seconds[engine][-1]:.1f} "
                      f"member_seconds={log.selection.get('member_seconds')}", flush=True)
    median = {engine: statistics.median(times) for engine, times in seconds.items()}
    same = selections["serial"] == selections["local"]
    print(f"cores={os.cpu_count()} load_average_1min={os.getloadavg()[0]:.1f} median_serial={median['serial']:.1f} "
          f"median_local={median['local']:.1f} ratio={median['serial'] / median['local']:.2f} same_selection={same}")


if __name__ == "__main__":
    main()
