"""Fitting cost of every registered method, in seconds per 1,000 training spots, on a prepared work folder.

Each method is fitted as ``he2st train`` fits it (its own defaults, a seeded validation draw from the
training patients, frozen embeddings of the default encoder) on the training samples of one fold, one
method after another in this process, and its whole fit is timed: set-up, every epoch and early stopping.
The figures are the ``cost`` column of :data:`he2st.methods.registry.METHODS`, which the ensemble's
``cost_budget`` reads; rerun this script on the reference machine when a method's fit changes, e.g.

    HE2ST_DATA_DIR=... python benchmarks/method_costs.py -w W --samples A1,C2,C3,C4,C5,C6 [--methods knn,nh2st]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    from he2st.data.embeddings import EmbedConfig
    from he2st.data.genes import GeneConfig, GenePanel
    from he2st.data.patches import PatchSpec
    from he2st.data.splits import validation_mask
    from he2st.data.spots import load_spots, shared_extras
    from he2st.data.workspace import Workspace
    from he2st.methods.registry import METHODS, create_method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--work-dir", required=True, help="prepared and embedded work folder")
    parser.add_argument("--samples", required=True, help="comma-separated training samples")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "ensemble"),
                        help="comma-separated methods (default: every registered method but the ensemble)")
    args = parser.parse_args()
    ws = Workspace(args.work_dir)
    ids = args.samples.split(",")
    samples = {sid: ws.load_sample(sid) for sid in ids}
    panel = GenePanel.from_config({sid: s.adata for sid, s in samples.items()}, GeneConfig())
    spots = load_spots(ws, ids, PatchSpec(), EmbedConfig(), panel, with_targets=True,
                       extras=shared_extras(samples.values()))
    patients = np.array([samples[s].patient_id for s in spots.sample_ids])
    val = validation_mask(spots.sample_ids, 0.15, seed=0, patients=patients)
    n = int((~val).sum())
    print(f"training spots {n}, validation spots {int(val.sum())}, genes {len(panel.genes)}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in args.methods.split(","):
        method = create_method(name, seed=0)
        start = time.perf_counter()
        method.fit(spots.subset(~val), spots.subset(val))
        seconds = time.perf_counter() - start
        print(f"method={name} fit_seconds={seconds:.1f} seconds_per_1000_spots={1000 * seconds / n:.2f}", flush=True)


if __name__ == "__main__":
    main()
