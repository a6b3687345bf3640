"""File helpers, in one place: what he2st may write (its own outputs only), atomic writes (no half-written
outputs), locks between he2st processes, checks of input files (one line naming the file and the problem),
JSON any reader accepts, and checksums.

Outputs. Every folder he2st writes into holds a marker file, ``.he2st-output``, listing the names of the
files and folders he2st wrote there. An existing output is replaced only when it is listed (he2st's own),
or when the caller allows it (``--overwrite``: :func:`overwriting`); anything else is refused in one line
naming the path and ``--overwrite``. A file where a folder belongs (or the reverse) is refused the same
way. Files are written to a temporary sibling and renamed onto the target (:func:`atomic_path`), folders
likewise (:func:`atomic_folder`), and the temporary copy is removed on every failure path.

Locks. :func:`output_lock` holds a lock (``filelock``) beside an output while it is written; the
lock's sidecar names the process (pid, host, command), so a second he2st process writing the same
output gets one line naming the first instead of a corrupt file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import He2stError

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

MARKER = ".he2st-output"  # in every folder he2st writes into: the names of the entries it wrote there
LOCKS = ".he2st-locks"  # beside outputs being written: one lock (and its owner sidecar) per output
OVERWRITE_HINT = "pass --overwrite to replace it"
_BOOKKEEPING = {MARKER, LOCKS}

_overwrite = False  # set by :func:`overwriting` (the commands' --overwrite)
_created: list[Path] = []  # folders made by this process, removed again by :func:`remove_created` if left empty


@contextlib.contextmanager
def overwriting(allowed: bool = True) -> Iterator[None]:
    """Within this block, outputs he2st did not write may be replaced (the commands' ``--overwrite``)."""
    global _overwrite
    before, _overwrite = _overwrite, bool(allowed) or _overwrite
    try:
        yield
    finally:
        _overwrite = before


def allow_overwrite(allowed: bool) -> None:
    """For the rest of this command, whether outputs he2st did not write may be replaced (``--overwrite``);
    the ``he2st`` entry point resets it for each command."""
    global _overwrite
    _overwrite = bool(allowed)


# ---------------------------------------------------------------------------------------------- what a path is
def path_kind(path: str | Path) -> str:
    """``missing``, ``file``, ``folder``, ``symbolic link loop``, ``broken symbolic link`` or ``special file``."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken symbolic link" if path.is_symlink() else "missing"
    except NotADirectoryError:
        return "missing"  # a parent is a file: reported by the parent check
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        raise He2stError(f"cannot be examined ({exc.strerror})", path) from exc
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "special file"


_SIGNATURES = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"II+\x00", "a BigTIFF image"), (b"MM\x00+", "a BigTIFF image"),
    (b"\x1f\x8b", "a gzip file"), (b"PK\x03\x04", "a zip archive (e.g. a torch checkpoint)"), (b"%PDF", "a PDF"),
    (b"GIF8", "a GIF image"), (b"BM", "a BMP image"),
)


def file_type(path: str | Path) -> str:
    """What a file is by its first bytes, in words (``"a PNG image"``, ``"a text file"``, ...)."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "an empty file"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of unknown type"


def _parent_problem(path: Path) -> He2stError | None:
    """A one-line error when the nearest existing folder above ``path`` is not a folder, or not writable."""
    for parent in path.parents:
        kind = path_kind(parent)
        if kind == "missing":
            continue
        if kind != "folder":
            return He2stError(f"is a {kind}, not a folder (needed to write {path})", parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            return He2stError(f"folder is not writable (needed to write {path})", parent)
        return None
    return None


def input_path(path: str | Path, what: str = "file", folder: bool = False, empty_ok: bool = False) -> Path:
    """``path`` when it is an existing, readable, non-empty file (``folder``: a folder), else one line naming it
    and the problem: not found, a symbolic link loop, a broken link, a folder where a file belongs (or the
    reverse), empty, not readable."""
    path = Path(path)
    kind = path_kind(path)
    want = "folder" if folder else "file"
    if kind == "missing":
        raise He2stError(f"{what} not found", path)
    if kind == "symbolic link loop":
        raise He2stError(f"{what} is a symbolic link loop (the link leads back to itself); fix or remove the link",
                         path)
    if kind == "broken symbolic link":
        raise He2stError(f"{what} is a symbolic link to {os.readlink(path)}, which does not exist", path)
    if kind != want:
        raise He2stError(f"{what} is a {kind}, not a {want}", path)
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        raise He2stError(f"{what} cannot be read (permission denied)", path)
    if not folder and not empty_ok and path.stat().st_size == 0:
        raise He2stError(f"{what} is empty (0 bytes)", path)
    return path


def table_path(path: str | Path, what: str = "table", empty_ok: bool = False) -> Path:
    """``path`` when it is a readable text file (a CSV/TSV table, a YAML config; plain or gzip-compressed), else
    one line naming it and what it is instead (:func:`input_path`'s problems, or a PNG, an HDF5 file, ...)."""
    path = input_path(path, what, empty_ok=empty_ok)
    kind = file_type(path)
    if kind not in ("a text file", "a gzip file", "an empty file"):
        raise He2stError(f"{what} is {kind}, not a text file", path)
    return path


def read_h5ad_checked(path: str | Path, what: str = ".h5ad file", backed: bool = False):
    """An AnnData read from ``path``, or one line naming the file and what it is instead: not found, empty,
    not HDF5 (a PNG, a text file, ...), truncated, HDF5 but not AnnData."""
    import anndata as ad

    path = checked_h5ad(path, what)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for damaged files
        raise He2stError(f"not a readable .h5ad file ({type(exc).__name__}: {_first_line(exc)})", path) from exc


def read_spots_h5ad(path: str | Path, what: str = ".h5ad file"):
    """:func:`read_h5ad_checked` of a file whose spots are drawn or called on a map: at least one spot and one
    gene, and finite (x, y) centres in ``obsm['spatial']``; else one line naming the file."""
    import numpy as np

    adata = read_h5ad_checked(path, what)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise He2stError(f"holds {adata.n_obs} spot(s) and {adata.n_vars} gene(s): nothing to map", path)
    xy = np.asarray(adata.obsm["spatial"]) if "spatial" in adata.obsm else None
    if xy is None or xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2].astype(float)).all():
        raise He2stError("no finite (x, y) spot centres in obsm['spatial']", path)
    return adata


def checked_h5ad(path: str | Path, what: str = ".h5ad file") -> Path:
    """``path`` when it is an HDF5 file with AnnData's obs and var, else one line naming the file and what it
    is instead: not found, empty, not HDF5 (a PNG, a text file, ...), truncated, HDF5 but not AnnData."""
    import h5py

    path = input_path(path, what)
    kind = file_type(path)
    if kind != "an HDF5 file" and not h5py.is_hdf5(path):  # (an HDF5 file may start after a user block)
        raise He2stError(f"not an .h5ad file: it is {kind} (an .h5ad is an HDF5 file)", path)
    try:
        with h5py.File(path, "r") as fh:
            if "obs" not in fh or "var" not in fh:
                raise He2stError("an HDF5 file but not an AnnData .h5ad (no obs/var)", path)
    except OSError as exc:
        raise He2stError(_hdf5_problem(exc), path) from exc
    return path


def _hdf5_problem(exc: BaseException) -> str:
    text = _first_line(exc)
    if "truncated" in text or "eof" in text.lower():
        return "truncated HDF5 file (it ends before its recorded end: not fully written or copied)"
    if "lock" in text.lower():
        return f"the HDF5 file is locked by another process ({text})"
    return f"not a readable HDF5 file ({text})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_finite(values, what: str, path: str | Path) -> None:
    """One line naming ``path`` when ``values`` (a dense or sparse matrix) hold NaN or infinite numbers."""
    data = getattr(values, "data", values) if hasattr(values, "tocsr") else values
    bad = ~np.isfinite(np.asarray(data, dtype=np.float64))
    if bad.any():
        raise He2stError(f"{what} holds {int(bad.sum())} non-finite value(s) (NaN or infinite)", path)


# ---------------------------------------------------------------------------------------------- outputs
def written_here(folder: str | Path) -> set[str]:
    """Names of the entries of ``folder`` that he2st wrote (its ``.he2st-output`` marker)."""
    try:
        return {line for line in (Path(folder) / MARKER).read_text(encoding="utf-8").splitlines() if line}
    except (OSError, UnicodeDecodeError):
        return set()


def record_output(path: str | Path) -> None:
    """List ``path`` in its folder's marker as he2st's own (appended: several processes may write one folder)."""
    path = Path(path)
    if path.name in written_here(path.parent):
        return
    with open(path.parent / MARKER, "a", encoding="utf-8") as fh:
        fh.write(path.name + "\n")


def is_own(path: str | Path) -> bool:
    """Whether he2st may replace ``path`` without ``--overwrite``: a file listed in its folder's marker, or a
    folder whose every entry is listed in its own marker (or that is empty). Links are never he2st's.

    A folder written whole (:func:`atomic_folder`) lists every entry under it (``tables/table/x``), so a file
    the user put into one of its subfolders makes it not he2st's: replacing the folder would delete that file.
    A marker of top-level names only (a folder written by an older he2st) is checked at the top level."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        entries = set(os.listdir(path)) - _BOOKKEEPING
        listed = written_here(path)
        if entries and any("/" in name for name in listed):
            return _tree(path) <= listed
        return not entries or entries <= listed
    return path.name in written_here(path.parent)


def _tree(folder: Path) -> set[str]:
    """Every entry under ``folder`` (files and folders, links not followed) as a ``/``-separated path relative
    to it, he2st's bookkeeping at its top aside."""
    entries = set()
    for parent, folders, files in os.walk(folder):
        relative = Path(parent).relative_to(folder)
        for name in folders + files:
            if relative.parts or name not in _BOOKKEEPING:
                entries.add((relative / name).as_posix())
    return entries


def check_output(path: str | Path, folder: bool = False, overwrite: bool | None = None) -> Path:
    """``path`` when he2st may write it (``folder``: as a folder), else one line naming it and the problem: its
    folder is a file or not writable, it is a file where a folder belongs (or the reverse), or it exists and
    is not he2st's own (``--overwrite`` allows replacing it). Writes nothing."""
    path = Path(path)
    problem = _parent_problem(path)
    if problem is not None:
        raise problem
    kind = path_kind(path)
    want = "folder" if folder else "file"
    if kind == "missing":
        return path
    if kind != want:
        raise He2stError(f"is a {kind}, but he2st writes a {want} here; move it away or choose another output path",
                         path)
    if not (overwrite if overwrite is not None else _overwrite) and not is_own(path):
        raise He2stError(f"exists and was not written by he2st; {OVERWRITE_HINT}", path)
    return path


def not_an_input(target: str | Path, inputs: Mapping[str, str | Path | None]) -> Path:
    """``target`` unless it is one of the command's input files (``{option: path}``), the same file by any
    path, else one line naming it and the option. An input he2st wrote earlier (a prepared sample) is its own
    by the marker, so :func:`check_output` would let the output replace the file being read."""
    target = Path(target)
    for option, path in inputs.items():
        if path is not None and _same_file(target, Path(path)):
            raise He2stError(f"is the input {option}, which the output would replace; choose another output folder "
                             "or name", target)
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def check_folder(path: str | Path) -> Path:
    """``path`` when he2st may write files into it: missing (made when written) or a writable folder; else one
    line naming it (a file where the folder belongs, a folder that is not writable, ...). Files already in
    it are not touched unless he2st writes one of the same name (:func:`check_output` decides). Writes
    nothing."""
    path = Path(path)
    problem = _parent_problem(path / "x")
    if problem is not None:
        raise He2stError(f"{problem.problem.split(' (needed')[0]} (the output folder)", problem.path)
    return path


def make_folder(path: str | Path) -> Path:
    """Make the output folder ``path`` (and its parents) after :func:`check_output`; folders made here are
    remembered so that a failed command removes the ones it left empty (:func:`remove_created`)."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if path_kind(folder) != "missing":
            break
        missing.append(folder)
    check_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise He2stError(f"cannot make the folder ({exc.strerror})", path) from exc
    _created.extend(reversed(missing))
    return path


def remove_created() -> None:
    """Remove the folders this process made that hold nothing but he2st's bookkeeping (a failed command)."""
    while _created:
        folder = _created.pop()
        with contextlib.suppress(OSError):
            if set(os.listdir(folder)) <= _BOOKKEEPING:
                shutil.rmtree(folder)


def forget_created() -> None:
    """Keep the folders made so far (a command that finished)."""
    _created.clear()


def _host() -> str:
    """This machine's name as it goes into temporary names: letters, digits and dots (no ``-``, which ends it)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "_"


def _temp_prefix(target: Path) -> str:
    """Temporary siblings are named after the target and the process writing them, with its machine: on a shared
    file system a process id says nothing of another machine's processes (see :func:`sweep_stale`)."""
    return f".{target.name}.he2st-{os.getpid()}@{_host()}-"


def sweep_stale(target: str | Path) -> None:
    """Remove temporary siblings of ``target`` left by he2st processes of this machine that were killed
    mid-write (the process named in the temporary name no longer runs here); those of running processes, and
    those another machine writes into a shared folder, are kept. A name without a machine is this machine's."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.he2st-(\d+)(?:@([A-Za-z0-9._]+))?-")
    here = _host()
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            found = pattern.match(entry.name)
            if found is None or found.group(2) not in (None, here) or _alive(int(found.group(1))):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    ``target`` is checked first (:func:`check_output`: he2st's own, or ``--overwrite``), and listed as
    he2st's own once written. Any exception removes the temporary file, so an interrupted or failed step
    never leaves a file that a later run would mistake for a finished result.
    """
    target = check_output(target, overwrite=overwrite)
    make_folder(target.parent)
    sweep_stale(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=suffix or ".part", dir=target.parent)
    except OSError as exc:
        raise He2stError(f"cannot be written ({_reason(exc) or exc.strerror or exc})", target) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(target):
            yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp creates 0600; results are for sharing
        check_output(target, overwrite=overwrite)  # again: another process may have put something there
        record_output(target)  # listed first: a crash between the two leaves a listed name, never a foreign file
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def writing(target: str | Path) -> Iterator[None]:
    """Within this block, a write that fails for want of space or permission becomes one line naming
    ``target`` (instead of a library's message that names no file)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # h5py reports a failed write as a RuntimeError without an errno
        reason = _reason(exc) if isinstance(exc, OSError) else _failed_write(exc, Path(target))
        if reason is None:
            raise
        raise He2stError(f"cannot be written ({reason})", target) from exc


def _failed_write(exc: RuntimeError, target: Path) -> str | None:
    """Why an HDF5 write failed (h5py names no errno): a nearly full device, else the library's words."""
    text = _first_line(exc)
    if "write failed" not in text and "No space" not in text:
        return None
    folder = next((p for p in (target, *target.parents) if p.is_dir()), Path("."))
    if shutil.disk_usage(folder).free < 64 * 2**20:
        return "no space left on the device"
    return f"the write failed: {text}"


_ENVIRONMENT = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def _reason(exc: OSError) -> str | None:
    """The environment's reason for a failed write (disk full, read-only, permissions), else None."""
    if exc.errno in _ENVIRONMENT:
        return _ENVIRONMENT[exc.errno]
    text = str(exc).lower()
    for words, reason in (("no space left", "no space left on the device"), ("read-only file system",
                          "read-only file system"), ("permission denied", "permission denied"),
                          ("quota", "disk quota exceeded")):
        if words in text:
            return reason
    return None


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a path (not yet existing) in a temporary folder beside ``target``; on success it replaces
    ``target`` (a folder: he2st's own, or ``--overwrite``) with a marker listing every entry under it. On any failure
    the temporary folder is removed and ``target`` is left as it was."""
    target = check_output(target, folder=True, overwrite=overwrite)
    make_folder(target.parent)
    sweep_stale(target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise He2stError(f"cannot be written ({_reason(exc) or exc.strerror or exc})", target) from exc
    try:
        built = scratch / "new"
        with writing(target):
            yield built
        (built / MARKER).write_text("".join(f"{name}\n" for name in sorted(_tree(built))), encoding="utf-8")
        check_output(target, folder=True, overwrite=overwrite)
        if target.exists():
            os.rename(target, scratch / "old")  # out of the way in one step; removed below with the scratch folder
        record_output(target)
        os.rename(built, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def output_lock(target: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold ``target``'s lock while writing it. Held by another process: with ``wait``, wait for it (a cache
    that the other process is filling: the caller then finds it done); else one line naming the process."""
    from filelock import FileLock, Timeout

    target = Path(target)
    locks = make_folder(target.parent / LOCKS)
    owner = locks / f"{target.name}.owner"
    lock = FileLock(locks / f"{target.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        if not wait:
            raise He2stError(f"is being written by another he2st process ({_holder(owner)}); wait for it to finish "
                             "or write elsewhere", target) from None
        import warnings

        from he2st.errors import He2stWarning

        warnings.warn(f"{target}: being written by another he2st process ({_holder(owner)}); waiting for it",
                      He2stWarning, stacklevel=3)
        lock.acquire(timeout=-1)
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                         f"{' '.join(['he2st', *sys.argv[1:]])[:200]}\n", encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _holder(owner: Path) -> str:
    try:
        return owner.read_text(encoding="utf-8").strip() or "unknown process"
    except OSError:
        return "unknown process"


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


def user_cache(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/he2st/<parts>``, by default ``~/.cache/he2st/<parts>``: he2st's caches when the user
    names no folder. An empty or relative ``$XDG_CACHE_HOME`` is ignored, as the XDG base directory
    specification asks: taken as is, it would put the cache in whatever folder the command runs from."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", "").strip()).expanduser()
    base = xdg if xdg.is_absolute() else Path.home() / ".cache"
    return base.joinpath("he2st", *parts)


def comma_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` as ``["a", "b", "c"]``: names given in one command-line option or setting; None for none."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


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
