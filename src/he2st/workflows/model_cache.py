"""The cache of ready-made models: each in its own folder ``<models dir>/<name>/`` -- the checkpoint
``model.pt`` (with any bank beside it) and ``model.json``, the stamp saying where it came from.

The models folder is ``$HE2ST_MODELS_DIR``, else ``$HE2ST_CACHE_DIR/models``, else the user cache
(``$XDG_CACHE_HOME/he2st/models``, by default ``~/.cache/he2st/models``); ``--models-dir`` overrides all.
Hosted files are downloaded there and checked against their sha256 before the folder is put in place; a
recipe is built in ``<models dir>/.work/<name>/`` (prepared samples, patches, embeddings: kept when a
build fails, so that a second try resumes; removed when it succeeds). A folder appears whole or not at all.

A cached model stands for its entry only while its stamp matches the entry's fingerprint. A hosted copy
that does not (other weights, or damaged files) is downloaded again. A built copy made from another recipe
or by another he2st version is refused in one line: rebuilding takes minutes and may change its
predictions, so that is the user's call (``he2st models build NAME``); its checkpoint path still works.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from he2st.errors import He2stError
from he2st.io import (
    atomic_folder,
    atomic_path,
    inside,
    output_lock,
    sha256_file,
    user_cache,
    write_json_atomic,
)
from he2st.workflows.model_zoo import CHECKPOINT, MODELS, ModelEntry, get_model

MODELS_DIR_ENV = "HE2ST_MODELS_DIR"
STAMP = "model.json"
Log = Callable[[str], None]


def models_home(override: str | Path | None = None) -> Path:
    """Where ready-made models are cached: ``override``, ``$HE2ST_MODELS_DIR``, ``$HE2ST_CACHE_DIR/models`` or
    ``$XDG_CACHE_HOME/he2st/models`` (``~/.cache/he2st/models``), the first that is set."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV]).expanduser()
    if os.environ.get("HE2ST_CACHE_DIR"):
        return Path(os.environ["HE2ST_CACHE_DIR"]).expanduser() / "models"
    return user_cache("models")


def model_folder(name: str, home: str | Path | None = None) -> Path:
    root = models_home(home)
    return inside(root, root / name, "model folder")


def read_stamp(name: str, home: str | Path | None = None) -> dict | None:
    """The cached model's stamp, or None when it is not cached (or its stamp is unreadable)."""
    try:
        stamp = json.loads((model_folder(name, home) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def cache_state(entry: ModelEntry, home: str | Path | None = None) -> str:
    """``cached``, ``not cached`` or ``stale (...)``: whether the cached copy stands for the entry (no checksums
    are computed, so that ``he2st models list`` answers at once)."""
    stamp = read_stamp(entry.name, home)
    if stamp is None:
        return "not cached"
    differs = _differences(entry, stamp)
    return f"stale ({'; '.join(differs)})" if differs else "cached"


def _differences(entry: ModelEntry, stamp: dict) -> list[str]:
    """How the cached copy's fingerprint differs from the entry's, in words."""
    wanted, have = entry.fingerprint(), stamp.get("fingerprint", {})
    words = {"files": "other hosted files", "recipe": "another recipe", "he2st": f"built by he2st {have.get('he2st')}"}
    return [words[key] for key in wanted if have.get(key) != wanted[key]]


def fetch_model(name: str, home: str | Path | None = None, log: Log | None = None) -> Path:
    """The checkpoint of ready-made model ``name``: the cached one when it matches its entry, else downloaded
    (hosted) or built from its recipe, once, while other he2st processes wanting it wait."""
    entry = get_model(name)
    folder = model_folder(name, home)
    with output_lock(folder, wait=True):
        stamp = read_stamp(name, home)
        if stamp is not None:
            differs = _differences(entry, stamp)
            if not differs and (entry.recipe is not None or _files_intact(entry, folder)):
                return folder / CHECKPOINT
            if entry.recipe is not None:
                raise He2stError(
                    f"the cached model {name} differs from its entry ({'; '.join(differs)}); rebuild it with "
                    f"`he2st models build {name}` (minutes), or pass --model {folder / CHECKPOINT} to use it as it is",
                    folder)
        if entry.recipe is None:
            return _download_all(entry, folder, log or _quiet)
        return _build(entry, folder, models_home(home), log or _quiet)


def build_model(name: str, home: str | Path | None = None, log: Log | None = None) -> Path:
    """Build ``name`` from its recipe, replacing any cached copy; the checkpoint's path."""
    entry = get_model(name)
    if entry.recipe is None:
        raise He2stError(f"model {name} has no recipe, only hosted weights: `he2st models fetch {name}` downloads them")
    folder = model_folder(name, home)
    with output_lock(folder, wait=True):
        return _build(entry, folder, models_home(home), log or _quiet)


def _quiet(_: str) -> None:
    """No progress lines."""


def _files_intact(entry: ModelEntry, folder: Path) -> bool:
    """Whether every hosted file in the cache still has its registered checksum (a damaged copy is fetched again)."""
    return all((folder / f.name).is_file() and sha256_file(folder / f.name) == f.sha256 for f in entry.files)


def _download_all(entry: ModelEntry, folder: Path, log: Log) -> Path:
    """Download every hosted file into a new folder, each checked against its sha256, then put it in place."""
    started = time.monotonic()
    with atomic_folder(folder) as built:
        for file in entry.files:
            log(f"downloading {file.url}")
            _download(file.url, built / file.name, file.sha256)
        _stamp(entry, built, time.monotonic() - started)
    return folder / CHECKPOINT


def _download(url: str, target: Path, sha256: str, timeout: float = 60.0) -> None:
    """``url`` into ``target``, which appears only when the bytes have the expected sha256."""
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
            got = sha256_file(tmp)
            if got != sha256:
                raise He2stError(f"refused: {url} has sha256 {got}, not the registered {sha256}; nothing was cached")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise He2stError(f"cannot download {url} ({exc})") from exc


def _build(entry: ModelEntry, folder: Path, home: Path, log: Log) -> Path:
    """Prepare the recipe's samples and train its method in the build folder, then put the model in place."""
    from he2st.workflows.prepare import prepare
    from he2st.workflows.train import train_model

    recipe = entry.recipe
    work = home / ".work" / entry.name
    recipe.train_config(work, work / CHECKPOINT)  # a bad setting fails here, before any work
    started = time.monotonic()
    log(f"building {entry.name}: {recipe.summary()}")
    try:  # the build's work folder goes whether the build ends or fails: only the model is kept
        prepared = prepare(recipe.prepare_config(work))
        log(f"prepared {len(prepared.sample_ids)} samples ({', '.join(prepared.sample_ids)}) in {work}")
        log(f"training {recipe.method} (minutes for an ensemble; reliability on inner patient folds at >= 3 "
            "patients)")
        with atomic_folder(folder) as built:
            fitted, _, _ = train_model(recipe.train_config(work, built / CHECKPOINT, prepared.sample_ids),
                                       command=f"he2st models build {entry.name}")
            log(f"trained {fitted.name} on {fitted.card.training_line()}")
            _stamp(entry, built, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder / CHECKPOINT


def _stamp(entry: ModelEntry, built: Path, seconds: float) -> None:
    """Written last: a folder without it is not a cached model."""
    from he2st.version import __version__

    write_json_atomic(built / STAMP, {
        "name": entry.name, "source": entry.source, "fingerprint": entry.fingerprint(), "he2st_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "seconds": round(seconds, 1),
        "recipe": None if entry.recipe is None else entry.recipe.model_dump(mode="json")})


def checkpoint_for(model: str, home: str | Path | None = None, log: Log | None = None) -> Path:
    """``--model``'s value as a checkpoint: an existing file, else a ready-made model's cached checkpoint
    (fetched or built first), else the path as given when it looks like one (its reader says what is wrong)."""
    path = Path(model)
    if path.exists() or path.is_symlink():
        return path
    if model in MODELS:
        return fetch_model(model, home, log)
    if os.sep in model or path.suffix:
        return path
    try:
        get_model(model)
    except He2stError as exc:  # neither a file nor a registered name: one line naming both
        raise He2stError(f"--model: no checkpoint file {model!r}, and {exc}") from None
    return path
