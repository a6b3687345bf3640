"""Training cost against the number of spots, on synthetic frozen features (1,280-d, 250 genes).

Prints one line per method and size, ``method=<name> n=<spots> seconds_per_epoch=<x>``: the median
over the epochs of each method's own training loop of one epoch's training pass, bank refresh included
(no validation set, so every epoch runs; CarHE's histology pre-training is off so an epoch means the same
thing for every method). One-off set-up of a fit (scalers, principal axes, neighbour search) is not an
epoch; non-neural baselines report their whole fit as one epoch. Sizes and methods are chosen with
``--n`` and ``--methods``; all sizes of one method run in this process, side by side. ``--options`` (JSON)
sets options of every method run, e.g. ``'{"candidates": []}'`` for the ensemble's members only.
``--engine local --workers N`` runs the fit's inner fits (the ensemble's inner folds and refits) on a pool of N
processes, as ``he2st train --engine local --workers N`` does.

    python benchmarks/train_scaling.py --n 2000,10000,40000,100000 --methods bleep,cmrcnet,nh2st,carhe,mlp
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.methods import create_method, list_methods, method_class
from he2st.methods.configs.common import merged_groups
from he2st.methods.inner_tasks import inner_tasks
from he2st.methods.neural import NeuralMethod
from he2st.workflows.engines import task_runner

DIM, GENES, TYPES = 1280, 250, 8


def synthetic(n: int, seed: int = 0) -> SpotSet:
    """Features carrying an expression signal, 20 slides of hexagonal-ish spot layouts, proportions."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 16)).astype(np.float32)
    features = latent @ rng.normal(size=(16, DIM)).astype(np.float32) + rng.normal(size=(n, DIM)).astype(np.float32)
    targets = np.log1p(np.exp(latent @ rng.normal(size=(16, GENES)).astype(np.float32) * 0.3))
    slides = np.arange(n) % 20
    side = int(np.ceil(np.sqrt(n / 20)))
    within = np.arange(n) // 20
    coords = np.stack([within % side, within // side], axis=1) * 100.0
    props = rng.dirichlet(np.ones(TYPES), size=n).astype(np.float32)
    return SpotSet(sample_ids=slides.astype(str).astype(object), barcodes=np.arange(n).astype(str).astype(object),
                   features=features, coords_um=coords, genes=[f"G{i}" for i in range(GENES)],
                   targets=targets.astype(np.float32), extras={"celltype_major": props})


def seconds_per_epoch(name: str, spots: SpotSet, epochs: int, extra: dict | None = None, engine: str = "serial",
                      workers: int = 1) -> float:
    options = {"train": {"epochs": epochs}} if issubclass(method_class(name), NeuralMethod) else {}
    options = merged_groups(options, extra or {})
    if name == "carhe":
        options["histology_pretrain_epochs"] = 0
    method = create_method(name, **options)
    method.panel = GenePanel(genes=spots.genes)
    with task_runner(engine, workers) as runner, inner_tasks(runner):
        start = time.perf_counter()
        log = method.fit(spots)
    total = time.perf_counter() - start
    return float(np.median(log.epoch_seconds)) if options and log.epoch_seconds else total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="2000,10000,40000,100000", help="comma-separated numbers of spots")
    ap.add_argument("--methods", default="bleep,bleep_faithful,cmrcnet,nh2st,carhe,mlp,ridge,knn")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per fit (the figure is their median)")
    ap.add_argument("--options", default="{}", help="JSON options given to every method run")
    ap.add_argument("--engine", default="serial", choices=["serial", "local"], help="where a fit's inner fits run")
    ap.add_argument("--workers", type=int, default=1, help="processes of the local engine")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    sizes = [int(v) for v in args.n.split(",")]
    for name in args.methods.split(","):
        if name not in list_methods():
            raise SystemExit(f"unknown method {name!r}; available: {', '.join(list_methods())}")
        for n in sizes:
            seconds = seconds_per_epoch(name, synthetic(n), args.epochs, json.loads(args.options), args.engine,
                                        args.workers)
            print(f"method={name} n={n} seconds_per_epoch={seconds:.2f}", flush=True)


if __name__ == "__main__":
    main()
