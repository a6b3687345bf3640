"""``he2st models list|show|fetch|build``: ready-made models (:mod:`he2st.workflows.model_zoo`).

``list`` and ``show`` read the registry and the cache's stamps only (no torch), so they answer at once;
``fetch`` downloads hosted weights or builds a recipe on first use, ``build`` always follows the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(no_args_is_help=True, help="Ready-made models: list, show, fetch (download or build), build.")

NameArg = Annotated[str, typer.Argument(help="ready-made model name (he2st models list)")]
ModelsDirOpt = Annotated[Path | None, typer.Option(
    "--models-dir", help="cache of ready-made models (default $HE2ST_MODELS_DIR, else $HE2ST_CACHE_DIR/models, else "
    "~/.cache/he2st/models)")]


@models_app.command("list")
def list_cmd(models_dir: ModelsDirOpt = None) -> None:
    """A table of the ready-made models: name, source (recipe or hosted), cache state, description."""
    from he2st.workflows.model_cache import cache_state
    from he2st.workflows.model_zoo import get_model, list_models

    rows = [("name", "source", "cache", "description")]
    for name in list_models():
        entry = get_model(name)
        rows.append((name, entry.source, cache_state(entry, models_dir), entry.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])


@models_app.command("show")
def show(name: NameArg, models_dir: ModelsDirOpt = None) -> None:
    """One model: what it was trained on, where not to use it, how it is made, and its card once cached.

    The card carries the accuracy to expect on a new patient, measured on inner patient folds."""
    from he2st.methods.registry import read_card
    from he2st.workflows.model_cache import cache_state, model_folder, read_stamp
    from he2st.workflows.model_zoo import CHECKPOINT, get_model

    entry = get_model(name)
    lines = [("name", entry.name), ("description", entry.description), ("training data", entry.trained_on),
             ("not for", entry.not_for)]
    if entry.recipe is not None:
        lines += [("recipe", entry.recipe.summary()), ("recipe sha256", entry.recipe.digest())]
    for file in entry.files:
        lines.append(("hosted", f"{file.name} from {file.url}, sha256 {file.sha256}"))
    folder = model_folder(name, models_dir)
    state = cache_state(entry, models_dir)
    lines.append(("cache", f"{state}: {folder}"))
    stamp = read_stamp(name, models_dir)
    if stamp is not None:
        made = f"{stamp.get('created')} by he2st {stamp.get('he2st_version')} in {stamp.get('seconds')} s"
        lines.append(("made", made))
        lines.append(("model card", str(folder / CHECKPOINT)))
        lines += read_card(folder / CHECKPOINT).describe()
    else:
        lines.append(("model card", f"once cached: `he2st models fetch {name}`"))
    for key, value in lines:
        typer.echo(f"{key:>16}: {value}")


@models_app.command("fetch")
def fetch(name: NameArg, models_dir: ModelsDirOpt = None) -> None:
    """Make a model available: the cached copy, else download (sha256-checked) or build it.

    Hosted weights are downloaded and checked against their sha256; a recipe is built (minutes). A cached
    build of another recipe or he2st version is refused: `he2st models build NAME` replaces it."""
    from he2st.workflows.model_cache import fetch_model

    typer.echo(f"{name}: {fetch_model(name, models_dir, log=typer.echo)}")


@models_app.command("build")
def build(name: NameArg, models_dir: ModelsDirOpt = None) -> None:
    """Build a model from its recipe, replacing the cached copy.

    Prepares the recipe's dataset in <models dir>/.work/NAME, then `he2st train` (seeded) into the cache."""
    from he2st.workflows.model_cache import build_model, read_stamp

    path = build_model(name, models_dir, log=typer.echo)
    typer.echo(f"built {name} in {read_stamp(name, models_dir)['seconds']} s: {path}")


def register(app: typer.Typer) -> None:
    """Add the ``models`` group to the ``he2st`` command line."""
    app.add_typer(models_app, name="models")
