"""``he2st stack`` / ``survival`` / ``localize``: analyses built on predicted expression (3D from serial
sections, outcome, cancer spots).

Kept out of ``cli.py`` like :mod:`he2st.cli_predict`; ``register(app)`` adds the commands to the main
``he2st`` app. Errors are :class:`He2stError`, printed by the entry point as one ``error: ...`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from he2st.io import comma_list

OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace existing outputs that he2st did not write "
                                                             "(default: refuse them)")]


def stack(
    sections: Annotated[list[Path], typer.Argument(
        help="serial sections in cutting order: slide images or prepared he2st sample .h5ad files")],
    spacing_um: Annotated[float, typer.Option("--spacing-um", help="distance between consecutive sections, µm")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint from `he2st train`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("he2st-stack"),
    pitch_um: Annotated[float, typer.Option("--pitch-um", help="common hexagonal grid pitch, µm")] = 100.0,
    interpolate: Annotated[int, typer.Option(help="planes linearly interpolated between adjacent sections")] = 0,
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel of the slide images (default: from "
                                                   "each file)")] = None,
    genes: Annotated[str | None, typer.Option(help="comma-separated genes to predict (default: the panel)")] = None,
    show: Annotated[str | None, typer.Option(help="comma-separated genes for the 3D views (default: the most "
                                                  "variable)")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register",
                                           help="register the sections (--no-register: as mounted)")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    weights: Annotated[Path | None, typer.Option(help="encoder weights file (default: as the model's training "
                                                      "features)")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """3D expression from serial H&E sections: register consecutive sections (rigid, then affine), predict
    each on one common grid, write <out>/stack.h5ad (x, y, z in µm) with stack.png and stack.html."""
    from he2st.io import allow_overwrite, write_json_atomic
    from he2st.methods import load_method
    from he2st.report.stack_view import draw_stack_png, stack_genes, write_stack_html
    from he2st.workflows.stack import build_stack, evaluate_stack

    allow_overwrite(overwrite)
    method = load_method(model)
    predicted, wanted = comma_list(genes) or list(method.panel.genes), comma_list(show) or []
    unknown = [g for g in wanted if g not in predicted]
    if unknown:  # before any work: the views can only show genes the stack predicts
        from he2st.errors import He2stError

        raise He2stError(f"--show {', '.join(unknown)}: not among the genes the stack predicts (--genes, else the "
                         "model's panel)")
    result = build_stack(sections, spacing_um, method, model, out, pitch_um, interpolate, mpp,
                         comma_list(genes), register, device, weights)
    info = result.adata.uns["he2st_stack"]["transforms"]
    for k, name in enumerate(result.adata.uns["he2st_stack"]["sections"]):
        entry, n = info[name], int((result.adata.obs["section"] == name).sum())
        fit = (f"tissue overlap (Dice) with the previous section {entry['dice_before']:.2f} as mounted -> "
               f"{entry['dice_after']:.2f} registered{'' if entry['affine_kept'] else ' (rigid; affine refused)'}"
               if "dice_after" in entry else "as mounted (not registered)" if k else "reference frame")
        typer.echo(f"{name}: {n} grid points; {fit}")
    shown = stack_genes(result.adata, comma_list(show))
    png = draw_stack_png(result.adata, out / "stack.png", shown[0])
    html = write_stack_html(result.adata, out / "stack.html", shown)
    if any(s.sample is not None for s in result.sections):
        scores = evaluate_stack(result)
        for name, s in scores["sections"].items():
            typer.echo(f"{name}: predicted vs measured, mean per-gene Pearson {s['pearson_mean']:.3f} "
                       f"({s['n_spots']} spots, {s['n_genes']} genes)")
        for pair, s in scores["adjacent"].items():
            typer.echo(f"{pair}: measured agreement at corresponding spots, registered r {s['registered']['profile_r']:.3f}"
                       f" ({s['registered']['n_pairs']} pairs) vs unregistered {s['unregistered']['profile_r']:.3f}"
                       f" ({s['unregistered']['n_pairs']} pairs)")
        write_json_atomic(out / "stack_evaluation.json", scores)
    typer.echo(f"written: {result.path}, {png}, {html}")


def survival(
    slides: Annotated[Path, typer.Option("--slides", help="CSV: prediction (.h5ad path), time, event (1/0)[, slide]"
                                                          "[, patient: a patient's slides stay in one fold]")],
    horizon: Annotated[float, typer.Option(help="DFS horizon for the classifier and the AUC (the table's time unit)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("he2st-survival"),
    signature: Annotated[Path | None, typer.Option(help="weighted gene list (gene,weight): its mean spot score "
                                                        "is a feature")] = None,
    genes: Annotated[str | None, typer.Option(help="comma-separated genes whose slide means are features")] = None,
    tls: Annotated[str | None, typer.Option(help="'her2st' or a gene,weight TLS model: TLS density (and mean "
                                                 "score) are features")] = None,
    tls_threshold: Annotated[float | None, typer.Option(help="TLS call threshold (default: 0.9 quantile of each "
                                                             "fold's training slides' spot scores)")] = None,
    folds: Annotated[int, typer.Option(help="cross-validation folds (stratified by event, by patient)")] = 5,
    penalizer: Annotated[float, typer.Option(help="Cox model L2 penalty")] = 0.1,
    bootstrap: Annotated[int, typer.Option(help="bootstrap draws for the 95% intervals")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the folds and the bootstrap")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Survival from predicted expression: slide features, a Cox model and a DFS classifier at --horizon,
    cross-validated C-index and time-dependent AUC with bootstrap intervals, and a Kaplan-Meier plot of the
    out-of-fold risk groups (results.json, risk.csv, km.png in --out)."""
    from he2st.evaluate.survival import patient_index
    from he2st.io import allow_overwrite
    from he2st.report.survival_plot import draw_km

    allow_overwrite(overwrite)
    from he2st.workflows.survival import run_survival

    result = run_survival(slides, out, horizon, signature, comma_list(genes), tls, tls_threshold, folds, penalizer,
                          bootstrap, seed)
    s = result.cv.scores
    n_patients = len(set(result.cohort.patients))
    typer.echo(f"{len(result.features)} slides of {n_patients} patients, "
               f"{int(result.cohort.event[patient_index(result.cohort.patients)[0]].sum())} events; features: "
               f"{', '.join(result.features.columns)}")
    for name, label in (("cox", "Cox model"), ("dfs", f"DFS classifier (horizon {horizon:g})")):
        typer.echo(f"{label}: C-index {s[f'{name}_c_index']:.3f} [{s[f'{name}_c_index_ci'][0]:.3f}, "
                   f"{s[f'{name}_c_index_ci'][1]:.3f}], AUC({horizon:g}) {s[f'{name}_auc']:.3f} "
                   f"[{s[f'{name}_auc_ci'][0]:.3f}, {s[f'{name}_auc_ci'][1]:.3f}] (out-of-fold, {folds} folds)")
    km = draw_km(result.cohort.time, result.cohort.event, result.high_risk, result.paths["km"], result.logrank_p,
                 result.cohort.patients)
    typer.echo(f"risk groups (median split): log-rank p {result.logrank_p:.3g}")
    typer.echo(f"written: {result.paths['results']}, {result.paths['risk']}, {km}")


def localize(
    prediction: Annotated[Path, typer.Argument(help="prediction .h5ad (he2st predict) or a prepared sample .h5ad")],
    signature: Annotated[str, typer.Option(
        "--signature", help="biomarker gene set: breast-her2, or a gene,weight table")] = "breast-her2",
    threshold: Annotated[float | None, typer.Option(help="call spots with a score at least this")] = None,
    quantile: Annotated[float, typer.Option(help="without labelled references: threshold as this quantile of the "
                                                 "reference scores")] = 0.5,
    threshold_from: Annotated[str | None, typer.Option(
        help="measured training sample .h5ad files (comma-separated): threshold from their region labels, else "
             "their scores' quantile")] = None,
    sample: Annotated[Path | None, typer.Option(help="measured sample .h5ad: compare scores (r; AUROC, AP against "
                                                     "its region labels)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: beside the input)")] = None,
    force: Annotated[bool, typer.Option(help="call spots even where the prediction cannot support it (noted)")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cancer spots from a biomarker signature: per-spot score (mean of the genes' within-section z-scores),
    calls, and a table <out>/<name>.localize.csv with a map over the H&E (<name>.localize.png)."""
    from he2st.io import allow_overwrite
    from he2st.report.plots import draw_beside, draw_cancer_map
    from he2st.workflows.localize import localize as run_localize

    allow_overwrite(overwrite)
    result = run_localize(prediction, out or prediction.parent, signature, threshold, quantile,
                          [Path(p) for p in comma_list(threshold_from) or []] or None, sample, force)
    info = result.info
    typer.echo(f"cancer score from {len(info['genes'])} genes ({', '.join(info['genes'])}; "
               f"{info['weight_coverage']:.0%} of the signature's weight); threshold {info['threshold']:.4g} from "
               f"{info['threshold_source']}: {info['n_called']} of {result.adata.n_obs} spots called")
    if info["refused_without_force"]:
        typer.echo(f"caution (--force): {info['refused_without_force']}")
    if result.agreement is not None:
        labelled = (f", AUROC {result.agreement['auroc']:.3f} and AP {result.agreement['ap']:.3f} for its "
                    f"cancer-labelled spots ({result.agreement['cancer_share']:.0%} of its labelled spots)"
                    if "auroc" in result.agreement else "")
        typer.echo(f"against the measured sample: r {result.agreement['pearson']:.3f}{labelled}")
    typer.echo(f"written: {result.path} and {draw_beside(result.path, draw_cancer_map, result.adata)}")


def register(app: typer.Typer) -> None:
    """Add ``stack``, ``survival`` and ``localize`` to the ``he2st`` command line."""
    app.command("stack")(stack)
    app.command("survival")(survival)
    app.command("localize")(localize)
