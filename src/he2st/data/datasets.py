"""Public datasets: which files make each one, where they come from, and their checksums.

A dataset lives in a cache folder (``$HE2ST_DATA_DIR`` or the user cache). ``fetch`` fills it from
the pinned upstream URLs and verifies every file; a folder that already holds byte-identical copies
(e.g. a shared read-only mirror) is used as is, without writing to it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from he2st.errors import He2stError
from he2st.io import atomic_path, sha256_file, user_cache

DATA_DIR_ENV = "HE2ST_DATA_DIR"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the dataset root (and to the upstream repository)
    sha256: str | None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    url_template: str  # formatted with commit= and path=
    commit: str
    files: tuple[RemoteFile, ...]
    marker: str  # a file whose presence identifies the dataset root
    citation: str

    def url(self, file: RemoteFile) -> str:
        return self.url_template.format(commit=self.commit, path=file.path)


def _manifest(name: str) -> tuple[RemoteFile, ...]:
    text = resources.files("he2st.data").joinpath(f"manifests/{name}.sha256").read_text()
    files = []
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            files.append(RemoteFile(path=path.strip(), sha256=digest))
    return tuple(files)


def _her2st() -> DatasetSpec:
    return DatasetSpec(
        name="her2st",
        description=(
            "HER2+ breast cancer, legacy ST (Andersson et al. 2021): counts for 36 sections of 8 patients, "
            "H&E for A1, B4, C2-C6, pathologist labels, cell-type proportions, TLS signature"
        ),
        url_template="https://raw.githubusercontent.com/almaan/her2st/{commit}/{path}",
        commit="85df7411b987a7dec3feff9718b869a7a82091ec",
        files=_manifest("her2st"),
        marker="data/ST-cnts/A1.tsv.gz",
        citation="Andersson et al., Nature Communications 12:6012 (2021)",
    )


DATASETS: dict[str, Callable[[], DatasetSpec]] = {"her2st": _her2st}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise He2stError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()


def data_home() -> Path:
    """``$HE2ST_DATA_DIR`` if set, else the user cache (``$XDG_CACHE_HOME/he2st/data``)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return user_cache("data")


def dataset_dir(name: str) -> Path:
    """Root folder of a dataset: ``$HE2ST_DATA_DIR`` itself when it already is that dataset, else a sub-folder."""
    spec = get_dataset(name)
    home = data_home()
    if (home / spec.marker).exists():
        return home
    return home / name


def fetch(
    name: str,
    verify: bool = True,
    on_file: Callable[[RemoteFile, str], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Make every file of the dataset present and verified; return the dataset root.

    ``on_file(file, status)`` is called per file with status ``"ok"`` or ``"downloaded"`` (progress).
    """
    spec = get_dataset(name)
    root = dataset_dir(name)
    for file in spec.files:
        target = root / file.path
        if target.exists():
            if verify and file.sha256 and sha256_file(target) != file.sha256:
                raise He2stError(
                    "checksum mismatch (file changed or truncated); delete it and run `he2st data fetch` again",
                    target,
                )
            status = "ok"
        else:
            _download(spec.url(file), target, file.sha256, timeout)
            status = "downloaded"
        if on_file is not None:
            on_file(file, status)
    return root


def _download(url: str, target: Path, sha256: str | None, timeout: float) -> None:
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
            if sha256 and sha256_file(tmp) != sha256:
                raise He2stError(f"downloaded file does not match its sha256 ({url})", target)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise He2stError(
            f"cannot download {url} ({exc}); without internet, put a copy of the dataset in a folder and set "
            f"{DATA_DIR_ENV} to it (now: {data_home()})",
            target,
        ) from exc


def missing_files(name: str) -> list[str]:
    """Relative paths of the dataset's files that are not in the cache yet."""
    spec = get_dataset(name)
    root = dataset_dir(name)
    return [f.path for f in spec.files if not (root / f.path).exists()]
