"""Training epoch with torch's per-tensor AdamW (its CPU default) against the fused AdamW the training loop uses.

Side by side in one process, alternating, ``--repeats`` times: each neural method trains ``--epochs``
epochs on synthetic spots (``train_scaling.synthetic``) with either optimiser, and one line per method
prints the median epoch seconds of each, their ratio, and the last training loss of each (the two
optimisers make the same update, so the losses agree to rounding).

    python benchmarks/optimiser_step.py --n 10000 --methods bleep,carhe,cmrcnet,nh2st,mlp
"""

from __future__ import annotations

import argparse

import numpy as np

from he2st.data.genes import GenePanel
from he2st.methods import create_method, training
from train_scaling import synthetic

PER_TENSOR = {"foreach": False}
FUSED = {"fused": True}


def epoch_seconds(name: str, spots, epochs: int, kind: dict[str, bool]) -> tuple[float, float]:
    """Median epoch seconds and last training loss of one fit with AdamW's implementation ``kind``."""
    default = dict(training.ADAMW_OPTIONS)
    training.ADAMW_OPTIONS.clear()
    training.ADAMW_OPTIONS.update(kind)
    try:
        options = {"train": {"epochs": epochs}} | ({"histology_pretrain_epochs": 0} if name == "carhe" else {})
        method = create_method(name, **options)
        method.panel = GenePanel(genes=spots.genes)
        log = method.fit(spots)
    finally:
        training.ADAMW_OPTIONS.clear()
        training.ADAMW_OPTIONS.update(default)
    return float(np.median(log.epoch_seconds)), log.curves["train_loss"][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="training spots")
    ap.add_argument("--methods", default="bleep,carhe,cmrcnet,nh2st,mlp")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per fit")
    ap.add_argument("--repeats", type=int, default=2, help="fits of each kind per method, alternating")
    args = ap.parse_args()
    spots = synthetic(args.n)
    for name in args.methods.split(","):
        runs: dict[str, list[tuple[float, float]]] = {"per_tensor": [], "fused": []}
        for _ in range(args.repeats):
            runs["per_tensor"].append(epoch_seconds(name, spots, args.epochs, PER_TENSOR))
            runs["fused"].append(epoch_seconds(name, spots, args.epochs, FUSED))
        slow, fast = (float(np.median([s for s, _ in runs[k]])) for k in ("per_tensor", "fused"))
        print(f"method={name} n={args.n} per_tensor_s={slow:.2f} fused_s={fast:.2f} ratio={slow / fast:.3f} "
              f"loss_per_tensor={runs['per_tensor'][-1][1]:.6f} loss_fused={runs['fused'][-1][1]:.6f}", flush=True)


if __name__ == "__main__":
    main()
