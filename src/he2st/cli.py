"""The ``he2st`` command line. Every command prints one ``error: ...`` line and exits 2 on bad input."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from he2st.errors import He2stError, He2stWarning
from he2st.io import comma_list

if TYPE_CHECKING:
    from he2st.workflows.adapt import Adapted

app = typer.Typer(no_args_is_help=True, add_completion=True, help="Predict spatial gene expression from H&E.")
data_app = typer.Typer(no_args_is_help=True, help="Public datasets: list, fetch, export-hest.")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a setting, e.g. --set patch.field_um=100")]
WorkOpt = Annotated[Path | None, typer.Option("--work-dir", "-w", help="work folder (default $HE2ST_WORK_DIR or ./he2st-work)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace existing outputs that he2st did not write "
                                                             "(default: refuse them)")]


def _overwrite(allowed: bool) -> None:
    from he2st.io import allow_overwrite

    allow_overwrite(allowed)


def _echo(text: str) -> None:
    typer.echo(text)


def _print_version(value: bool) -> None:
    if value:
        from he2st.version import __version__

        typer.echo(f"he2st {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the he2st version and exit")] = False) -> None:
    """Predict spatial gene expression from H&E."""


@data_app.command("list")
def data_list() -> None:
    """List registered datasets and whether they are in the local cache."""
    from he2st.data.datasets import DATASETS, dataset_dir, get_dataset, missing_files

    for name in DATASETS:
        spec = get_dataset(name)
        missing = missing_files(name)
        state = "complete" if not missing else f"{len(spec.files) - len(missing)}/{len(spec.files)} files"
        _echo(f"{name}\t{len(spec.files)} files\t{state}\t{dataset_dir(name)}")
        _echo(f"\t{spec.description}")


@data_app.command("fetch")
def data_fetch(name: str, urls: Annotated[bool, typer.Option(help="only print file URLs")] = False) -> None:
    """Download (or verify an existing copy of) a dataset into $HE2ST_DATA_DIR."""
    from he2st.data.datasets import fetch, get_dataset
    from he2st.progress import progress_bar

    spec = get_dataset(name)
    if urls:
        for f in spec.files:
            _echo(f"{spec.url(f)}\t{f.sha256 or '-'}")
        return
    counts = {"ok": 0, "downloaded": 0}
    with progress_bar(len(spec.files), f"fetch {name}") as advance:
        def _tick(_file, status: str) -> None:
            counts[status] += 1
            advance(1)

        root = fetch(name, on_file=_tick)
    _echo(f"{name}: {counts['ok']} verified, {counts['downloaded']} downloaded -> {root}")


@app.command()
def prepare(config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
            dataset: Annotated[str | None, typer.Option(help="registered dataset")] = None,
            sections: Annotated[str | None, typer.Option(
                "--samples", "--sections", help="comma-separated sections of the dataset, e.g. A1,B4")] = None,
            samplesheet: Annotated[Path | None, typer.Option(
                help="CSV: sample, patient, reader, path, image[, pixel_size_um, spots_file]")] = None,
            from_dir: Annotated[Path | None, typer.Option(
                help="prepare every Space Ranger outs/, legacy ST triple or .h5ad under this folder")] = None,
            overwrite: OverwriteOpt = False) -> None:
    """Read a dataset into samples, patch caches and patient-level folds."""
    _overwrite(overwrite)
    from he2st.io import write_text_atomic
    from he2st.progress import progress_bar
    from he2st.workflows.config import PrepareConfig, dump_config, load_config
    from he2st.workflows.prepare import prepare as run_prepare

    cfg = load_config(
        PrepareConfig, config, set_, work_dir=str(work_dir) if work_dir else None, **{
            "data.dataset": dataset, "data.sections": sections.split(",") if sections else None,
            "data.samplesheet": str(samplesheet) if samplesheet else None,
            "data.from_dir": str(from_dir) if from_dir else None},
    )
    with progress_bar(None, "patches") as advance:
        result = run_prepare(cfg, on_patch=advance)
    write_text_atomic(result.workspace.root / "prepare.yaml", dump_config(cfg))
    _echo(f"prepared {len(result.sample_ids)} samples ({', '.join(result.sample_ids)}) in {result.workspace.root}")
    _echo(f"folds ({cfg.folds.scheme}): {result.folds_path}" if result.folds_path else f"note: {result.note}")


@app.command()
def info(sample: Annotated[str, typer.Argument(help="sample id (prepared, or a her2st section) or a .h5ad path")],
         work_dir: WorkOpt = None) -> None:
    """Spots, genes, µm/px, image size and patient of a sample."""
    from he2st.data.patches import PatchSpec, too_coarse, upsampling
    from he2st.data.sample_header import SampleHeader
    from he2st.data.workspace import Workspace, default_work_dir

    ws = Workspace(work_dir or default_work_dir())
    if sample.endswith(".h5ad"):  # sample files answer from their header, without loading the expression
        obj = SampleHeader.read(sample)
    elif ws.sample_path(sample).is_symlink() or ws.sample_path(sample).exists():  # a broken link: said so
        obj = SampleHeader.read(ws.prepared_sample_path(sample))
    else:
        from he2st.data.her2st import SECTIONS, load_section

        if sample not in SECTIONS:
            raise He2stError(f"unknown sample {sample!r}: not prepared in {ws.root} and not a her2st section")
        obj = load_section(sample)
    for key, value in obj.summary().items():
        _echo(f"{key:>16}: {value}")
    patch = PatchSpec()
    note = "" if too_coarse(obj.pixel_size_um, patch) is None else " (too coarse: see `he2st prepare`'s warning)"
    _echo(f"{'upsampling':>16}: {upsampling(obj.pixel_size_um, patch):.2f}x for {patch.key} patches{note}")


@app.command()
def embed(
    config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
    encoder: Annotated[str | None, typer.Option(help="preset or timm name (default efficientnet_lite0)")] = None,
    weights: Annotated[Path | None, typer.Option(help="local weights file/folder")] = None,
    batch_size: Annotated[int | None, typer.Option(help="patches per encoder batch (default 64)")] = None,
    runtime: Annotated[str | None, typer.Option(
        help="auto (an ONNX graph on OpenVINO or ONNX Runtime on a CPU, torch on a GPU), torch, onnxruntime, "
             "openvino")] = None,
    samples: Annotated[str | None, typer.Option(help="comma-separated sample ids (default: all prepared)")] = None,
    engine: Annotated[str | None, typer.Option(
        help="embed samples in parallel, one task each: local (a process pool) or ray (default: one by one)")] = None,
    workers: Annotated[int, typer.Option(help="samples embedded at once (with --engine)")] = 2,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray instance)")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Embed every prepared spot's patch with a frozen encoder (resumable, reused when done).

    Exit status with --engine: 0 every sample embedded; 1 some failed (each named in an `error:` line on
    stderr, the others written); 2 bad input before any work."""
    _overwrite(overwrite)
    from he2st.data.workspace import Workspace
    from he2st.progress import progress_bar
    from he2st.workflows.config import EmbedRunConfig, load_config
    from he2st.workflows.embed import embed_workspace, patches_to_embed

    cfg = load_config(EmbedRunConfig, config, set_, work_dir=str(work_dir) if work_dir else None, **{
        "embed.encoder": encoder, "embed.weights": str(weights) if weights else None, "embed.batch_size": batch_size,
        "embed.runtime": runtime})
    ws = Workspace(cfg.work_dir)
    ids = samples.split(",") if samples else ws.sample_ids()
    if not ids:
        raise He2stError(f"no prepared samples in {ws.root}; run `he2st prepare` first")
    if engine is not None:
        from he2st.workflows.embed import embed_many

        with progress_bar(len(ids), f"embed {cfg.embed.encoder} ({engine}, {workers} workers)") as advance:
            outcomes = embed_many(ws, ids, cfg.patch, cfg.embed, engine, workers, address, lambda _: advance(1))
        for o in outcomes:
            _echo(f"{o.status}\t{o.sample}\t{o.error or f'{o.n_embedded} patches in {o.seconds:.1f} s'}")
        for o in outcomes:  # the failure summary: one line per sample, on stderr
            if o.status == "failed":
                typer.echo(f"error: sample {o.sample}: {o.error}", err=True)
        if any(o.status == "failed" for o in outcomes):
            raise typer.Exit(1)
        return
    with progress_bar(patches_to_embed(ws, ids, cfg.patch, cfg.embed), f"embed {cfg.embed.encoder}") as advance:
        summary = embed_workspace(ws, ids, cfg.patch, cfg.embed, on_progress=advance)
    for sid, path in summary.paths.items():
        _echo(f"{sid}\t{path}")
    if summary.n_embedded:
        _echo(f"embedded {summary.n_embedded} patches in {summary.seconds:.1f} s: {summary.throughput:.1f} patches/s "
              f"(runtime {', '.join(sorted(summary.runtimes))})")
    else:
        _echo("all embeddings already present: nothing to do")


@app.command()
def adapt(
    config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
    encoder: Annotated[str | None, typer.Option(
        help="preset or timm name to adapt (default efficientnet_lite0)")] = None,
    weights: Annotated[Path | None, typer.Option(help="its local weights file/folder")] = None,
    samples: Annotated[str | None, typer.Option(
        help="comma-separated sample ids whose patches are used (default: every sample with a patch cache)")] = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the patches drawn for each epoch (default 2)")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Adapt an encoder to the study's own H&E patches, self-supervised (images only: no expression is read).

    Writes encoders/<encoder>__adapted-<recipe>.pt in the work folder and its record beside it; embed with
    it by `he2st embed --weights <that file>`. Options: --set adapt.train_blocks=2, adapt.max_patches, ...
    Several recipes in one run: --set 'sweep=[{train_blocks: 2}, {train_blocks: 4}]', each a view
    (adapted-<recipe>) that the ensemble chooses among on inner folds."""
    _overwrite(overwrite)
    from he2st.data.workspace import Workspace
    from he2st.progress import progress_bar
    from he2st.workflows.adapt import adapt_workspace
    from he2st.workflows.config import AdaptRunConfig, load_config

    cfg = load_config(AdaptRunConfig, config, set_, work_dir=str(work_dir) if work_dir else None, **{
        "encoder": encoder, "weights": str(weights) if weights else None,
        "samples": samples.split(",") if samples else None, "adapt.epochs": epochs})
    ws = Workspace(cfg.work_dir)
    recipes = cfg.recipes()
    done = []
    for i, options in enumerate(recipes, 1):
        label = f"adapt {cfg.encoder}" + (f" (recipe {i} of {len(recipes)})" if len(recipes) > 1 else "")
        with progress_bar(None, label) as advance:
            done.append(adapt_workspace(ws, cfg.samples, cfg.patch, cfg.encoder, cfg.weights, options,
                                        on_step=advance, on_start=lambda total, advance=advance: advance(0, total=total)))
        _echo_adapted(done[-1], cfg.encoder)
    base = f"he2st embed -w {ws.root} --encoder {cfg.encoder}"
    if len(done) == 1:
        _echo(f"embed with them: {base} --weights {done[0].weights}")
        return
    views = ",".join(d.view for d in done)
    base += f" --weights {cfg.weights}" if cfg.weights else ""
    _echo(f"embed each as a view: {base} --set 'embed.views=[{views}]'; with the same --set, train and benchmark "
          "let the ensemble choose among them on inner folds")


def _echo_adapted(done: Adapted, encoder: str) -> None:
    """One recipe's outcome: reused, or its losses, time and weights file."""
    record = done.record
    if done.reused:
        _echo(f"already adapted with this recipe: {done.weights}")
        return
    losses = record["epoch_loss"]
    _echo(f"adapted {encoder} on {len(record['samples'])} samples, {len(losses)} epoch(s) of "
          f"{record['patches_per_epoch']} patches in {record['seconds']:.0f} s: loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} (-1 is perfect agreement of the views)")
    _echo(f"weights: {done.weights}")


@app.command("methods")
def methods_cmd(name: Annotated[str | None, typer.Argument(help="show one method's options")] = None) -> None:
    """List methods, or one method's options with defaults and what they do."""
    import shutil

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    for line in method_lines(name, width):
        _echo(line)


def method_lines(name: str | None = None, width: int | None = None) -> list[str]:
    """``he2st methods [NAME]``: every method with one line on what it is, or one method's options with
    defaults and descriptions; with ``width``, wrapped on word boundaries (no word is ever cut)."""
    import textwrap

    from he2st.methods.registry import list_methods, method_config, method_summary

    def wrap(text: str, indent: str, hang: str) -> list[str]:
        if width is None:
            return [indent + text]
        return textwrap.wrap(text, max(width, 40), initial_indent=indent, subsequent_indent=hang,
                             break_long_words=False, break_on_hyphens=False)

    lines = []
    for method in [name] if name else list_methods():
        lines += wrap(f"{method}: {method_summary(method)}", "", "    ")
        if name:
            config = method_config(method)
            defaults = config()
            for field, info in config.model_fields.items():
                lines += wrap(f"{field} = {getattr(defaults, field)!r}", "  ", "      ")
                if info.description:
                    lines += wrap(info.description, "      # ", "      # ")
    return lines


@app.command()
def train(
    config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
    method: Annotated[str | None, typer.Option(help="method name (he2st methods: bleep, bleep_faithful, ridge, ...)")] = None,
    samples: Annotated[str | None, typer.Option(help="comma-separated training samples (default: all prepared)")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="checkpoint file, not a folder (default <work>/models/<method>.pt)")] = None,
    devices: Annotated[int | None, typer.Option(
        help="training processes sharing each batch: N CPU processes (gloo), or one per GPU (NCCL) with CUDA")] = None,
    unlabelled: Annotated[str | None, typer.Option(
        help="comma-separated prepared samples whose images only (never counts) join histology-only learning (carhe)")
    ] = None,
    engine: Annotated[str | None, typer.Option(
        help="run the inner-fold fits and refits: serial (one by one, the default), local (a process pool) or ray")] = None,
    workers: Annotated[int | None, typer.Option(help="fits run at once with --engine local or ray (default 2)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray instance)")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train one method on training samples; validation comes from those samples only. With --devices N
    (or under torchrun) N processes train data-parallel: the same steps as one process, split. With --engine,
    the fits inside the fit (the ensemble's inner folds and refits, the reliability's inner folds) run
    --workers at a time."""
    _overwrite(overwrite)
    from he2st.methods.distributed import is_main
    from he2st.workflows.config import TrainRunConfig, load_config
    from he2st.workflows.train import train_model

    cfg = load_config(TrainRunConfig, config, set_, work_dir=str(work_dir) if work_dir else None,
                      method=method, train_samples=comma_list(samples), out=str(out) if out else None, devices=devices,
                      unlabelled=comma_list(unlabelled), engine=engine, workers=workers, address=address)
    fitted, log, path = train_model(cfg, command=" ".join(["he2st", *sys.argv[1:]]))
    if is_main():
        epoch = "" if log.best_epoch is None else f", best epoch {log.best_epoch}"
        _echo(f"trained {fitted.name} on {fitted.card.training_line()} ({len(fitted.panel.genes)} genes{epoch}) -> {path}")


@app.command()
def tls(
    prediction: Annotated[Path, typer.Argument(help="prediction .h5ad (he2st predict) or a prepared sample .h5ad")],
    signature: Annotated[str, typer.Option(
        "--signature", help="TLS gene model: her2st, her2st-signature, chemokine-12, melanoma-cabrita, or a "
                            "gene,weight table")] = "her2st",
    threshold: Annotated[float | None, typer.Option(help="call spots with a score at least this")] = None,
    quantile: Annotated[float, typer.Option(help="threshold as this quantile of the reference scores")] = 0.9,
    threshold_from: Annotated[str | None, typer.Option(
        help="measured training sample .h5ad files (comma-separated): threshold = the quantile of their scores")] = None,
    sample: Annotated[Path | None, typer.Option(help="measured sample .h5ad: compare TLS scores (r, AUROC)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: beside the input)")] = None,
    force: Annotated[bool, typer.Option(help="call spots even where the prediction cannot support it (noted)")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """TLS score per spot (her2st's published model or any weighted gene list), calls and connected regions,
    written into <out>/<name>.tls.h5ad with a map over the H&E (<name>.tls.png)."""
    _overwrite(overwrite)
    from he2st.report.plots import draw_beside, draw_tls_map
    from he2st.workflows.tls import detect_tls

    result = detect_tls(prediction, out or prediction.parent, signature, threshold, quantile,
                        [Path(p) for p in threshold_from.split(",")] if threshold_from else None, sample, force)
    info = result.adata.uns["he2st_tls"]
    _echo(f"TLS score from {info['genes_used']} genes ({info['weight_coverage']:.0%} of the model's weight); "
          f"threshold {info['threshold']:.4g} from {result.threshold_source}: {info['n_called']} spots called "
          f"in {info['n_regions']} regions")
    if info["refused_without_force"]:
        _echo(f"caution (--force): {info['refused_without_force']}")
    if result.agreement is not None:
        _echo(f"against the measured sample: r {result.agreement['pearson']:.3f}, AUROC for its top-decile spots "
              f"{result.agreement['auroc_top_decile']:.3f}, precision of the calls "
              f"{result.agreement.get('precision', float('nan')):.3f}")
    _echo(f"written: {result.path} and {draw_beside(result.path, draw_tls_map, result.adata)}")


@app.command()
def card(model: Annotated[Path, typer.Argument(help="checkpoint from `he2st train`")]) -> None:
    """Print a checkpoint's model card: training data, intended tissue, encoder and weights checksum,
    inputs, gene panel and the scores known at training time with the command that produced them."""
    from he2st.methods.registry import read_card

    for key, value in read_card(model).describe():
        _echo(f"{key:>16}: {value}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint from `he2st train`")],
    samples: Annotated[str, typer.Option(help="comma-separated held-out samples")],
    work_dir: WorkOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output folder (default <work>/runs/evaluate_<model name>)")] = None,
    allow_training_patients: Annotated[bool, typer.Option(help="score samples of training patients (labelled LEAKY)")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score a trained model on held-out samples (per-gene Pearson/Spearman, MSE, MAE, gene sets)."""
    from he2st.data.workspace import default_work_dir

    _overwrite(overwrite)
    from he2st.workflows.evaluate import evaluate_model

    wd = work_dir or default_work_dir()
    out_dir = out or Path(wd) / "runs" / f"evaluate_{model.stem}"
    _, table, paths = evaluate_model(model, wd, comma_list(samples) or [], out_dir,
                                     allow_training_patients=allow_training_patients,
                                     command=" ".join(["he2st", *sys.argv[1:]]))
    _echo(table)
    _echo(f"results: {paths['json']}")


@app.command()
def benchmark(
    config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
    dataset: Annotated[str | None, typer.Option(help="prepare this dataset first if the work folder is empty")] = None,
    methods: Annotated[str | None, typer.Option(
        help="comma-separated methods (default: ensemble, bleep_faithful, bleep, ridge, ridge_cv, mlp, knn)")] = None,
    folds: Annotated[str | None, typer.Option(help="lopo (leave one patient out, the default) or loso")] = None,
    ablation: Annotated[bool | None, typer.Option("--ablation/--no-ablation", help="also run each method with one component switched off at a time")] = None,
    name: Annotated[str | None, typer.Option(help="results folder name under <work>/runs/")] = None,
    engine: Annotated[str | None, typer.Option(
        help="run the (fold, method) tasks: serial (one by one, the default), local (a process pool) or ray")] = None,
    workers: Annotated[int | None, typer.Option(help="tasks run at once with --engine local or ray (default 2)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray instance)")] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume/--no-resume", help="reuse tasks stored by an earlier run of this folder with unchanged inputs "
                                     "(default)")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run methods over patient-level folds and write results (JSON, CSV, markdown). Each finished (fold,
    method) is stored in the run folder, so the same command run again reuses it and runs only the rest."""
    _overwrite(overwrite)
    from he2st.workflows.config import BenchmarkConfig, load_config

    cfg = load_config(BenchmarkConfig, config, set_, work_dir=str(work_dir) if work_dir else None, name=name,
                      methods=comma_list(methods), ablation=ablation, engine=engine, workers=workers, address=address,
                      resume=resume, **{"folds.scheme": folds})
    _run_benchmark(cfg, dataset)


def _run_benchmark(cfg, dataset: str | None = None) -> None:
    from he2st.data.workspace import Workspace
    from he2st.progress import progress_bar
    from he2st.workflows.benchmark import run_benchmark
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.embed import embed_workspace, patches_to_embed
    from he2st.workflows.prepare import prepare as run_prepare

    ws = Workspace(cfg.work_dir)
    if dataset:
        run_prepare(PrepareConfig(work_dir=cfg.work_dir, data={"dataset": dataset}, patch=cfg.patch,
                                  folds=cfg.folds))
    elif not ws.folds_path(cfg.folds.scheme).exists():
        from he2st.workflows.benchmark import missing_folds

        raise missing_folds(ws, cfg.folds.scheme)
    from he2st.workflows.benchmark import check_outputs

    check_outputs(cfg)  # before embedding: results he2st did not write are refused here, not at the end
    ids = ws.sample_ids()
    with progress_bar(patches_to_embed(ws, ids, cfg.patch, cfg.embed), f"embed {cfg.embed.encoder}") as advance:
        summary = embed_workspace(ws, ids, cfg.patch, cfg.embed, on_progress=advance)
    if summary.n_embedded:
        _echo(f"embedded {summary.n_embedded} patches ({summary.throughput:.1f} patches/s)")
    outcome = run_benchmark(cfg, log=_echo)
    _echo("")
    _echo(f"mean per-gene Pearson over {cfg.folds.scheme} folds (gene sets chosen on training data; "
          f"*_testselected = chosen on the test sample, as BLEEP reports):")
    _echo(outcome.table)
    if outcome.curve is not None and not outcome.curve.empty:
        from he2st.report.plots import learning_curve_figure, save_figure

        figure = save_figure(learning_curve_figure(outcome.curve, f"heg{cfg.n_top}"),
                             outcome.paths["json"].parent / "learning_curve.png")
        _echo(f"learning curve: {figure}")
    _echo(f"results: {outcome.paths['json'].parent}")


DEMO_METHODS = ["ensemble", "bleep", "knn", "ridge_cv"]  # the default and three of its four members


@app.command()
def demo(work_dir: WorkOpt = None, set_: SetOpt = None) -> None:
    """The main job: fetch her2st -> prepare -> embed -> benchmark the default ensemble beside three of its
    members (bleep, knn, ridge_cv), leave-one-patient-out, with each model's reliability (--set methods=[...] for
    others)."""
    from he2st.workflows.config import BenchmarkConfig, load_config

    overrides = list(set_ or [])
    if not any(item.split("=", 1)[0].strip() == "methods" for item in overrides):
        overrides.insert(0, f"methods=[{','.join(DEMO_METHODS)}]")
    cfg = load_config(BenchmarkConfig, None, overrides, work_dir=str(work_dir) if work_dir else None, name="demo")
    _run_benchmark(cfg, dataset="her2st")


from he2st.cli_predict import register as _register_predict_commands  # noqa: E402

_register_predict_commands(app)
from he2st.cli_analyses import register as _register_analysis_commands  # noqa: E402

_register_analysis_commands(app)
from he2st.cli_hest import register as _register_hest_commands  # noqa: E402

_register_hest_commands(app, data_app)
from he2st.cli_models import register as _register_model_commands  # noqa: E402

_register_model_commands(app)


def _run_app() -> None:
    from he2st.io import allow_overwrite

    try:
        app()
    finally:
        allow_overwrite(False)


def main() -> None:
    """Console-script entry point. Exit status: 0 done; 1 some items of a batch failed (each named in an
    ``error:`` line); 2 bad input or environment (one ``error: <file>: <problem>`` line, nothing left half
    written); 3 an internal error (a bug: one line, the traceback with ``HE2ST_DEBUG=1``); 130 interrupted.
    Each :class:`He2stWarning` is one line ``warning: <message>``. See docs/robustness.md."""
    import os

    from he2st.io import allow_overwrite, forget_created, remove_created
    from he2st.progress import quiet_libraries

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, He2stWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    def fail(message: str, code: int) -> None:
        remove_created()  # output folders this run made and left empty
        typer.echo("error: " + " ".join(message.split()), err=True)
        sys.exit(code)

    warnings.showwarning = one_line
    quiet_libraries()
    forget_created()
    allow_overwrite(False)  # until the command's --overwrite says otherwise
    try:
        _run_app()
    except SystemExit as exc:
        remove_created() if exc.code not in (0, None) else forget_created()
        raise
    except He2stError as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        remove_created()
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        fail("out of memory (try a smaller --chunk or --batch-size, or fewer --workers)", 2)
    except OSError as exc:  # the environment: disk full, permissions, a read-only file system
        if os.environ.get("HE2ST_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("HE2ST_DEBUG"):
            raise
        fail(f"internal error ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
             "please report it; HE2ST_DEBUG=1 shows the traceback", 3)
    forget_created()
