"""Render the documentation's figures from a real he2st run, with he2st's own plotting.

    python scripts/make_doc_figures.py --work-dir W --run demo --method ensemble --sample C3 [--stack stackC]

Reads the benchmark run ``W/runs/<run>/`` (``he2st benchmark`` or ``he2st demo``): the held-out
predictions of ``--method`` for ``--sample`` (``predictions/<method>/<sample>.h5ad``) and the measured
sample (``W/samples/<sample>.h5ad``), and writes into ``docs/assets/`` (or ``--out``):

- ``predicted-vs-measured.png``: predicted | measured maps over the H&E, one colour scale per gene;
- ``prediction-maps.png``: maps of the predicted genes that vary most;
- ``stack.png``: with ``--stack DIR`` (a ``he2st stack`` output folder), the 3D view of ``stack.h5ad``.

Every figure is drawn by ``he2st.report`` from files the run wrote; nothing is simulated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad

from he2st.data.sample import Sample
from he2st.report.plots import (
    expression_maps,
    pair_with_measured,
    predicted_vs_measured,
    save_figure,
    scale_label,
    spatial_view,
)
from he2st.report.stack_view import draw_stack_png, stack_genes

REPO = Path(__file__).resolve().parents[1]


def _with_background(prediction: ad.AnnData, sample: Sample) -> ad.AnnData:
    """Benchmark predictions hold spot centres only; give them the measured sample's H&E view."""
    if "spatial" not in prediction.uns and "spatial" in sample.adata.uns:
        prediction.uns["spatial"] = dict(sample.adata.uns["spatial"])
    return prediction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", "-w", type=Path, required=True, help="he2st work folder")
    parser.add_argument("--run", default="demo", help="run name under <work>/runs/ [demo]")
    parser.add_argument("--method", default="ensemble", help="method whose predictions are drawn [ensemble]")
    parser.add_argument("--sample", required=True, help="held-out sample id, e.g. C3")
    parser.add_argument("--genes", help="comma-separated genes (default: the most variable expressed ones)")
    parser.add_argument("--stack", type=Path, help="a `he2st stack` output folder (holding stack.h5ad)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets", help="folder for the PNGs")
    parser.add_argument("--dpi", type=int, default=72, help="resolution of the PNGs [72]")
    args = parser.parse_args(argv)

    genes = [g.strip() for g in args.genes.split(",")] if args.genes else None
    pred_path = args.work_dir / "runs" / args.run / "predictions" / args.method / f"{args.sample}.h5ad"
    sample = Sample.load(args.work_dir / "samples" / f"{args.sample}.h5ad")
    prediction = _with_background(ad.read_h5ad(pred_path), sample)
    paired = pair_with_measured(prediction, sample)
    written = [
        save_figure(predicted_vs_measured(paired, spatial_view(prediction), genes, 2, scale_label(prediction)),
                    args.out / "predicted-vs-measured.png", args.dpi),
        save_figure(expression_maps(prediction, genes, 3), args.out / "prediction-maps.png", args.dpi),
    ]
    if args.stack is not None:
        stack = ad.read_h5ad(args.stack / "stack.h5ad")
        written.append(draw_stack_png(stack, args.out / "stack.png", stack_genes(stack, genes)[0]))
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
