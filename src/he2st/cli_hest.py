"""``he2st hest-bench`` and ``he2st data export-hest``: HEST-Benchmark's layout and protocol.

Kept out of ``cli.py`` like :mod:`he2st.cli_predict`; ``register(app, data_app)`` adds the commands.
Errors are :class:`He2stError`, printed by the entry point as one ``error: ...`` line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from he2st.io import comma_list


def hest_bench(
    bench_dir: Annotated[Path, typer.Option("--bench-dir", help="HEST-Benchmark folder: one folder per task "
                                                                "(splits/, var_50genes.json, patches, expression)")],
    tasks: Annotated[str | None, typer.Option(
        help="comma-separated task folders, e.g. IDC,PRAD (default: all)")] = None,
    methods: Annotated[str | None, typer.Option(
        help="comma-separated he2st methods beside hest-ridge (default ridge,ridge_cv,knn)")] = None,
    encoder: Annotated[str | None, typer.Option(help="preset or timm name (default efficientnet_lite0)")] = None,
    weights: Annotated[Path | None, typer.Option(help="local encoder weights file/folder")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output folder for the results (default ./hest-bench-results)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override a setting, e.g. --set embed.batch_size=32 --set method_options.knn.top_k=20")] = None,
) -> None:
    """Run HEST-Benchmark's tasks: the hest-ridge row exactly as HEST's linear probe (comparable with its
    table) and he2st methods on the same splits and genes, each scored HEST's way (pooled test spots) and
    he2st's way (per held-out sample); results.json, results.csv and results.md in --out."""
    from he2st.workflows.config import load_config
    from he2st.workflows.hest_bench import HestBenchConfig, run_hest_bench

    cfg = load_config(HestBenchConfig, config, set_, bench_dir=str(bench_dir), tasks=comma_list(tasks),
                      methods=comma_list(methods), out=str(out) if out else None, **{
                          "embed.encoder": encoder, "embed.weights": str(weights) if weights else None})
    outcome = run_hest_bench(cfg, log=typer.echo, command=" ".join(["he2st", *sys.argv[1:]]))
    typer.echo("")
    typer.echo(outcome.paths["markdown"].read_text())
    typer.echo(f"results: {outcome.paths['json'].parent}")


def export_hest(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: the benchmark folder to write the task into")],
    work_dir: Annotated[Path | None, typer.Option("--work-dir", "-w", help="prepared work folder "
                                                  "(default $HE2ST_WORK_DIR or ./he2st-work)")] = None,
    task: Annotated[str, typer.Option(help="task folder name")] = "he2st",
    samples: Annotated[str | None, typer.Option(help="comma-separated samples (default: all prepared)")] = None,
    n_genes: Annotated[int, typer.Option(min=1, help="genes in var_50genes.json")] = 50,
    selection: Annotated[str, typer.Option(help="hvg: highest variance of log1p counts (the file's 'var'); "
                                                "heg: highest mean")] = "hvg",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (for patch.*)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a setting, e.g. patch.field_um=100")] = None,
) -> None:
    """Write prepared samples in HEST-Benchmark's layout (patches, expression, leave-one-patient-out
    splits, gene list) so `he2st hest-bench` -- or HEST's own script -- can benchmark them."""
    from he2st.workflows.config import WorkConfig, load_config
    from he2st.workflows.export_hest import export_hest as run_export

    cfg = load_config(WorkConfig, config, set_, work_dir=str(work_dir) if work_dir else None)
    result = run_export(cfg.work_dir, out, task, cfg.patch, comma_list(samples), n_genes, selection)
    typer.echo(f"exported {len(result.samples)} samples, {result.n_splits} leave-one-patient-out splits and "
               f"{len(result.genes)} genes ({selection}) -> {result.root}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    """Add ``hest-bench`` to ``he2st`` and ``export-hest`` to ``he2st data``."""
    app.command("hest-bench")(hest_bench)
    data_app.command("export-hest")(export_hest)
