"""``he2st predict`` / ``plot`` / ``report``: from a trained model and a new slide to maps and an HTML report.

Kept out of ``cli.py`` so the prediction commands can grow without touching the training CLI;
``register(app)`` adds them to the main ``he2st`` app. Errors are :class:`He2stError`, which the
``he2st`` entry point prints as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from he2st.cli_models import ModelsDirOpt
from he2st.io import comma_list

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="checkpoint from `he2st train`, or a ready-made model's name (he2st models list)")]
GenesOpt = Annotated[str | None, typer.Option(help="comma-separated genes to show (default: the most predictable, "
                                                    "by their expected r; else the most variable)")]
SampleOpt = Annotated[Path | None, typer.Option("--sample", help="measured he2st sample .h5ad to compare with")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace existing outputs that he2st did not write "
                                                             "(default: refuse them)")]


def predict(
    model: ModelOpt,
    slide: Annotated[list[Path] | None, typer.Option(
        "--slide", "-s", help="whole-slide image (SVS, NDPI, TIFF, JPEG, ...); repeat it for several slides")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: he2st-predictions)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with PredictConfig fields")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a setting: key=value (repeatable)")] = None,
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel (default: from the file)")] = None,
    max_upsample: Annotated[float | None, typer.Option(
        "--max-upsample", help="largest upsampling of the slide [2x that of the model's coarsest training slide, "
        "at least 2x]")] = None,
    pitch_um: Annotated[float | None, typer.Option("--pitch-um", help="hexagonal grid pitch, µm [100]")] = None,
    spots_from: Annotated[Path | None, typer.Option("--spots-from",
                                                    help="predict at this he2st sample's spots (.h5ad)")] = None,
    mask: Annotated[Path | None, typer.Option(
        help="tissue mask PNG (same aspect as the slide) instead of detection")] = None,
    genes: Annotated[str | None, typer.Option(
        help="comma-separated genes (default: the panel); genes beyond it come from the model's transcriptome bank")] = None,
    transcriptome: Annotated[bool, typer.Option(
        "--transcriptome", help="write the panel and every gene of the model's transcriptome bank")] = False,
    coverage: Annotated[float | None, typer.Option(
        help="level of the per-spot prediction intervals of a calibrated model [0.9]")] = None,
    chunk: Annotated[int | None, typer.Option(help="spots per chunk (memory ~ chunk x patch size) [512]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="encoder batch size [64]")] = None,
    weights: Annotated[Path | None, typer.Option(
        help="encoder weights file (default: as the model's training features)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, ... (default: auto)")] = None,
    stain: Annotated[str | None, typer.Option(
        help="none, macenko or reinhard (default: as the model's training features)")] = None,
    tta: Annotated[str | None, typer.Option(
        help="none, flips or d4 (default: as the model's training features)")] = None,
    library_id: Annotated[str | None, typer.Option(help="output name (default: slide file stem; sample id with --spots-from)")] = None,
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="also write maps.png into <out>/<library-id>/")] = True,
    format: Annotated[str | None, typer.Option(
        "--format", help="h5ad, or zarr: also a SpatialData store <out>/<library-id>.zarr (default: h5ad)")] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="CSV of slides (columns slide[, mpp, spots_from, out]): one task per slide")] = None,
    engine: Annotated[str, typer.Option(help="for several slides: local (a process pool) or ray")] = "local",
    workers: Annotated[int, typer.Option(help="slides predicted at once")] = 2,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray instance)")] = None,
    models_dir: ModelsDirOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Predict expression over a new slide: hexagonal spots on detected tissue -> one .h5ad (resumable).

    Settings (PredictConfig) come from defaults < --config YAML < --set key=value < the flags.
    Exit status: 0 every slide predicted; 1 some slides failed (each named in an `error:` line on stderr,
    the others written, all listed in <out>/index.csv); 2 bad input before any work (one `error:` line).
    A ready-made model (--model NAME) is downloaded or built into the models cache on first use."""
    from he2st.io import allow_overwrite
    from he2st.methods import load_method
    from he2st.predict import PredictConfig, run_prediction
    from he2st.progress import progress_bar
    from he2st.workflows.config import load_config
    from he2st.workflows.model_cache import checkpoint_for

    slides = list(slide or [])
    cfg = load_config(PredictConfig, config, set_, model=model, slide=_path(slides[0]) if len(slides) == 1 else None,
                      out=_path(out), mpp=mpp, max_upsample=max_upsample,
                      pitch_um=pitch_um, spots_from=_path(spots_from), mask=_path(mask), genes=genes,
                      transcriptome=transcriptome or None, chunk=chunk, batch_size=batch_size,
                      weights=_path(weights), device=device, stain=stain,
                      tta=tta, library_id=library_id, format=format, overwrite=overwrite or None,
                      coverage=coverage)
    if manifest is not None or len(slides) > 1:
        from he2st.errors import He2stError

        if cfg.library_id is not None:
            raise He2stError("library_id names the output of one slide; with several slides each output is named "
                             "after its slide (or its manifest out column)", manifest)
        for key, flag in (("mask", "--mask"), ("spots_from", "--spots-from")):
            if getattr(cfg, key) is not None:  # one slide's tissue or spots would be every slide's
                raise He2stError(f"{flag} belongs to one slide; with several slides give each its own "
                                 f"({'a manifest spots_from column' if key == 'spots_from' else 'one command per slide'})",
                                 manifest)
    if manifest is None and len(slides) == 1:
        from he2st.predict.slide import check_slide_scale

        check_slide_scale(cfg)  # before a ready-made model is fetched or built for it
    checkpoint = checkpoint_for(model, models_dir, log=typer.echo)  # before --overwrite: it is for the outputs
    allow_overwrite(overwrite)  # the maps too
    cfg = cfg.model_copy(update={"model": checkpoint})
    if manifest is not None or len(slides) > 1:
        _predict_many(checkpoint, cfg, slides, manifest, engine, workers, address, maps)
        return
    method = load_method(checkpoint)
    if maps:
        from he2st.report.plots import check_prediction_figures, plot_prediction
    # a foreign maps.png is refused with the prediction's outputs, before any work, not after it
    check_maps = (lambda out: check_prediction_figures(_maps_folder(out))) if maps else None
    with progress_bar(None, "predict") as advance:
        path = run_prediction(cfg, method, on_chunk=lambda info: advance(info.n_spots, total=info.total_spots),
                              check_beside=check_maps)
    typer.echo(f"predictions: {path}")
    if cfg.format == "zarr":
        typer.echo(f"SpatialData store: {path.with_suffix('.zarr')}")
    if maps:
        written = plot_prediction(path, _maps_folder(path))
        typer.echo(f"maps: {written['maps']}")


def _maps_folder(prediction: Path) -> Path:
    """``<out>/<library-id>/``, where the maps of ``<out>/<library-id>.h5ad`` go."""
    return prediction.parent / prediction.stem


def _predict_many(model: Path, cfg, slides: list[Path], manifest: Path | None, engine: str, workers: int,
                  address: str | None, maps: bool) -> None:
    """Several slides: one task each on the chosen engine, one overall progress bar, an index CSV, and each
    predicted slide's maps beside its prediction (as for one slide)."""
    from he2st.progress import progress_bar
    from he2st.workflows.batch_predict import output_of, predict_many, read_manifest, slide_configs

    rows = ([{"slide": str(s)} for s in slides]) + (read_manifest(manifest) if manifest is not None else [])
    configs = slide_configs(cfg, rows, manifest)
    if maps:
        from he2st.report.plots import check_prediction_figures, plot_prediction

        for output in filter(None, map(output_of, configs)):  # foreign maps are refused before any work
            check_prediction_figures(_maps_folder(output))
    with progress_bar(len(configs), f"predict ({engine}, {workers} workers)") as advance:
        outcomes = predict_many(model, configs, cfg.out, engine, workers, address, on_done=lambda _: advance(1))
    for o in outcomes:
        typer.echo(f"{o.status}\t{o.slide}\t{o.output or o.error}")
        if maps and o.status == "done":
            typer.echo(f"maps: {plot_prediction(Path(o.output), _maps_folder(Path(o.output)))['maps']}")
    failed = [o for o in outcomes if o.status == "failed"]
    typer.echo(f"{len(outcomes) - len(failed)} of {len(outcomes)} slides predicted; index: {cfg.out / 'index.csv'}")
    for o in failed:  # the failure summary: one line per slide, on stderr
        typer.echo(f"error: {o.error if o.error.startswith(o.slide) else f'{o.slide}: {o.error}'}", err=True)
    if failed:
        raise typer.Exit(1)


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def plot(
    prediction: Annotated[Path, typer.Argument(help="prediction .h5ad from `he2st predict`")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output folder for the PNGs (default: <prediction> without .h5ad)")] = None,
    genes: GenesOpt = None,
    sample: SampleOpt = None,
    n: Annotated[int, typer.Option(min=1, help="number of genes when --genes is not given")] = 6,
    overwrite: OverwriteOpt = False,
) -> None:
    """Maps of predicted expression over the H&E; with --sample, predicted vs measured with per-gene Pearson."""
    from he2st.io import allow_overwrite

    allow_overwrite(overwrite)
    from he2st.report.plots import pair_with_measured, plot_prediction

    folder = out or prediction.with_suffix("")
    paths = plot_prediction(prediction, folder, comma_list(genes), sample, n)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
    if sample is not None:
        import numpy as np

        r = np.array(list(pair_with_measured(prediction, sample).pearson.values()))
        typer.echo(f"per-gene Pearson vs measured: mean {np.nanmean(r):.3f}, median {np.nanmedian(r):.3f} "
                   f"({len(r)} genes)")


def report(
    prediction: Annotated[Path, typer.Argument(help="prediction .h5ad from `he2st predict`")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output folder for <name>.html (default: beside the prediction)")] = None,
    sample: SampleOpt = None,
    results: Annotated[Path | None, typer.Option(help="results.json of `he2st benchmark`/`evaluate`")] = None,
    genes: GenesOpt = None,
    title: Annotated[str | None, typer.Option(help="report title")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """One self-contained HTML report: summary, metrics, maps, measured comparison, training curves, uncertainty."""
    from he2st.errors import He2stError
    from he2st.io import allow_overwrite

    allow_overwrite(overwrite)
    from he2st.report.html import build_report

    if out is not None and out.suffix.lower() in (".html", ".htm"):
        raise He2stError(f"--out is a folder (the report is written as <out>/{prediction.stem}.html)", out)
    folder = out if out is not None else prediction.parent
    path = build_report(prediction, folder / f"{prediction.stem}.html", sample=sample, results=results,
                        genes=comma_list(genes), title=title)
    typer.echo(f"report: {path}")


def register(app: typer.Typer) -> None:
    """Add ``predict``, ``plot`` and ``report`` to the ``he2st`` command line."""
    app.command("predict")(predict)
    app.command("plot")(plot)
    app.command("report")(report)
