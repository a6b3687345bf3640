"""Small file helpers: atomic writes (no half-written outputs), JSON any reader accepts, and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import He2stError

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    Any exception removes the temporary file, so an interrupted or failed step never leaves a
    file that a later run would mistake for a finished result.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp creates 0600; results are for sharing
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(value: Any, where: str = "results") -> Any:
    """Plain JSON types, with NaN/inf as null: Python's default ``NaN`` token is not JSON, and strict readers
    (browsers, jq, other languages) refuse the whole file over one undefined score."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise He2stError(f"{where} has a value of type {type(value).__name__} that cannot be written as JSON")


def write_json_atomic(target: str | Path, value: Any) -> None:
    """Write ``value`` as indented, valid JSON (:func:`jsonable`) atomically."""
    write_text_atomic(target, json.dumps(jsonable(value, Path(target).name), indent=2, allow_nan=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_name(value: str, what: str = "name") -> str:
    """``value`` when it can be one component of a file name he2st writes: letters, digits, ``.``, ``_``,
    ``-``, no leading dot, no separator, at most 128 characters. Sample, patient and run ids come from
    configs, file names and metadata; one like ``../../x`` would otherwise write outside the work folder."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise He2stError(f"{what} {value!r} is not a safe name (letters, digits, '.', '_', '-'; no leading dot, "
                         "no path separator)")
    return value


def name_from_stem(stem: str) -> str:
    """A safe name (:func:`safe_name`) made from a file's stem, for outputs named after an input file:
    characters outside letters, digits and ``._-`` become ``_``, leading dots are dropped."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:128]
    return cleaned or "slide"


def inside(root: str | Path, path: str | Path, what: str = "output path") -> Path:
    """``path`` when it lies inside the folder ``root``, else a one-line :class:`He2stError`.

    Every path he2st writes under a folder the user named is built from parts that may come from data
    (ids, manifest columns); this is the last check before writing. It compares normalised absolute
    paths (``..`` collapsed) without following links, so a work folder whose subfolders are links the user
    made to another disk stays usable."""
    base = Path(os.path.abspath(root))
    target = Path(os.path.abspath(path))
    if target != base and base not in target.parents:
        raise He2stError(f"{what} {str(path)!r} leaves the output folder {base}")
    return Path(path)
