"""The ``he2st`` command line. Every command prints one ``error: ...`` line and exits 2 on bad input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from he2st.errors import He2stError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Predict spatial gene expression from H&E.")
data_app = typer.Typer(no_args_is_help=True, help="Public datasets: list and fetch.")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a setting, e.g. --set patch.field_um=100")]
WorkOpt = Annotated[Path | None, typer.Option("--work-dir", "-w", help="work folder (default $HE2ST_WORK_DIR or ./he2st-work)")]


def _echo(text: str) -> None:
    typer.echo(text)


@data_app.command("list")
def data_list() -> None:
    """List registered datasets and whether they are in the local cache."""
    from he2st.data.registry import DATASETS, dataset_dir, get_dataset, missing_files

    for name in DATASETS:
        spec = get_dataset(name)
        missing = missing_files(name)
        state = "complete" if not missing else f"{len(spec.files) - len(missing)}/{len(spec.files)} files"
        _echo(f"{name}\t{len(spec.files)} files\t{state}\t{dataset_dir(name)}")
        _echo(f"\t{spec.description}")


@data_app.command("fetch")
def data_fetch(name: str, urls: Annotated[bool, typer.Option(help="only print file URLs")] = False) -> None:
    """Download (or verify an existing copy of) a dataset into $HE2ST_DATA_DIR."""
    from he2st.data.registry import fetch, get_dataset
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
            sections: Annotated[str | None, typer.Option(help="comma-separated sections, e.g. A1,B4")] = None) -> None:
    """Read a dataset into samples, patch caches, patient-level folds and per-fold gene panels."""
    from he2st.config import PrepareConfig, dump_config, load_config
    from he2st.io import write_text_atomic
    from he2st.prepare import prepare as run_prepare
    from he2st.progress import progress_bar

    cfg = load_config(
        PrepareConfig, config, set_, work_dir=str(work_dir) if work_dir else None, **{
            "data.dataset": dataset, "data.sections": sections.split(",") if sections else None},
    )
    with progress_bar(None, "patches") as advance:
        result = run_prepare(cfg, on_patch=advance)
    write_text_atomic(result.workspace.root / "prepare.yaml", dump_config(cfg))
    _echo(f"prepared {len(result.sample_ids)} samples ({', '.join(result.sample_ids)}) in {result.workspace.root}")
    _echo(f"folds ({cfg.folds.scheme}): {result.folds_path}")


@app.command()
def info(sample: Annotated[str, typer.Argument(help="sample id (prepared, or a her2st section) or a .h5ad path")],
         work_dir: WorkOpt = None) -> None:
    """Spots, genes, µm/px, image size and patient of a sample."""
    from he2st.config import default_work_dir
    from he2st.data.her2st import SECTIONS, load_section
    from he2st.data.sample import Sample
    from he2st.workspace import Workspace

    ws = Workspace(work_dir or default_work_dir())
    if sample.endswith(".h5ad"):
        obj = Sample.load(sample)
    elif ws.sample_path(sample).exists():
        obj = ws.load_sample(sample)
    elif sample in SECTIONS:
        obj = load_section(sample)
    else:
        raise He2stError(f"unknown sample {sample!r}: not prepared in {ws.root} and not a her2st section")
    for key, value in obj.summary().items():
        _echo(f"{key:>16}: {value}")


@app.command()
def embed(
    config: ConfigOpt = None, set_: SetOpt = None, work_dir: WorkOpt = None,
    encoder: Annotated[str | None, typer.Option(help="preset or timm name (default efficientnet_lite0)")] = None,
    weights: Annotated[Path | None, typer.Option(help="local weights file/folder")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    samples: Annotated[str | None, typer.Option(help="comma-separated sample ids (default: all prepared)")] = None,
) -> None:
    """Embed every prepared spot's patch with a frozen encoder (resumable, reused when done)."""
    from he2st.config import EmbedRunConfig, load_config
    from he2st.embed import embed_workspace
    from he2st.progress import progress_bar
    from he2st.workspace import Workspace

    cfg = load_config(EmbedRunConfig, config, set_, work_dir=str(work_dir) if work_dir else None, **{
        "embed.encoder": encoder, "embed.weights": str(weights) if weights else None, "embed.batch_size": batch_size})
    ws = Workspace(cfg.work_dir)
    ids = samples.split(",") if samples else ws.sample_ids()
    if not ids:
        raise He2stError(f"no prepared samples in {ws.root}; run `he2st prepare` first")
    total = sum(ws.load_sample(s).n_spots for s in ids)
    with progress_bar(total, f"embed {cfg.embed.encoder}") as advance:
        summary = embed_workspace(ws, ids, cfg.patch, cfg.embed, on_progress=advance)
    for sid, path in summary.paths.items():
        _echo(f"{sid}\t{path}")
    if summary.n_embedded:
        _echo(f"embedded {summary.n_embedded} patches in {summary.seconds:.1f} s: {summary.throughput:.1f} patches/s")
    else:
        _echo("all embeddings already present: nothing to do")


@app.command()
def demo(work_dir: WorkOpt = None) -> None:
    """Fetch her2st, prepare the 7 imaged sections and summarise them."""
    from he2st.config import PrepareConfig, load_config
    from he2st.prepare import prepare as run_prepare

    cfg = load_config(PrepareConfig, None, None, work_dir=str(work_dir) if work_dir else None)
    result = run_prepare(cfg)
    for sid in result.sample_ids:
        s = result.workspace.load_sample(sid)
        _echo(f"{sid}\tpatient {s.patient_id}\t{s.n_spots} spots\t{s.pixel_size_um:.3f} µm/px")


def main() -> None:
    """Console-script entry point: turn :class:`He2stError` into one line on stderr and exit code 2."""
    try:
        app()
    except He2stError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
