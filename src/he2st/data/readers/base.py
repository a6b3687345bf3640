"""The reader registry: each technology's source options, and the helpers readers share.

A reader is one options model (the keys a user writes under ``data.samples`` for it) whose ``read`` turns
those files into a :class:`~he2st.data.sample.Sample`. ``@register_reader("name")`` gives the model its
``reader: Literal["name"]`` tag and files it, so the configuration parses each source into its own
reader's model (unknown keys are refused per reader) and the list of readers is never written twice.
"""

from __future__ import annotations

import difflib
import gzip
import re
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal, TypeVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from he2st.data.sample import Sample, build_adata
from he2st.errors import He2stError, for_validator
from he2st.io import safe_name


class SourceOptions(BaseModel):
    """The keys every source has; each reader adds its own (see :func:`reader_options`)."""

    model_config = ConfigDict(extra="forbid")

    reader: str = Field(
        description="which reader reads the files (an unknown name is refused with the list of readers)")
    sample_id: str = Field(description="the sample's id (a file name in the work folder)")
    patient_id: str | None = Field(None, description="default: the sample is its own patient")
    path: Path = Field(description="the reader's main input: a folder or a counts file")
    image: Path | None = Field(None, description="H&E image (default: what the reader finds beside path)")
    pixel_size_um: float | None = Field(
        None, gt=0, description="µm/px of the image; overrides what the reader derives from its files")

    @field_validator("sample_id", "patient_id")
    @classmethod
    def _safe(cls, value: str | None) -> str | None:
        """Ids become file names: refused here, before anything is read, if they could escape the folder."""
        if value is not None:
            for_validator(safe_name, value, "id")
        return value

    @abstractmethod
    def read(self) -> Sample:
        """The sample these options describe; bad files raise one-line :class:`He2stError`s naming them."""


OptionsT = TypeVar("OptionsT", bound=SourceOptions)
_READERS: dict[str, type[SourceOptions]] = {}


def register_reader(name: str) -> Callable[[type[OptionsT]], type[OptionsT]]:
    """Class decorator: file ``cls`` as the options (and ``read``) of reader ``name``.

    The registered class is ``cls`` with ``reader`` narrowed to ``Literal[name]``: the tag a configuration's
    sources are told apart by."""

    def decorate(cls: type[OptionsT]) -> type[OptionsT]:
        if name in _READERS:
            raise ValueError(f"reader {name!r} is registered twice")
        tagged = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__,
                              reader=(Literal[name], Field(name, description=f"the {name} reader")))
        tagged.__qualname__ = cls.__qualname__
        _READERS[name] = tagged
        return tagged

    return decorate


def list_readers() -> list[str]:
    """Names of the registered readers, sorted."""
    return sorted(_READERS)


def reader_options(name: str) -> type[SourceOptions]:
    """The options model of reader ``name``: its fields are the keys a source of that reader takes."""
    if name not in _READERS:
        close = difflib.get_close_matches(name, list(_READERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise He2stError(f"unknown reader {name!r}{hint} (readers: {', '.join(list_readers())})")
    return _READERS[name]


# ---------------------------------------------------------------------------- shared helpers
def require(path: Path, what: str) -> Path:
    """``path``, or a one-line error naming it when it does not exist."""
    if not path.exists():
        raise He2stError(f"{what} not found", path)
    return path


def open_text(path: Path) -> IO[str]:
    """A text file, gunzipped on the fly when its name ends in ``.gz`` (as public archives ship them)."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def find_file(folders: list[Path], name: str) -> Path | None:
    """The file called ``name`` in the first of ``folders`` that holds one, also as ``name.gz`` and behind a
    sample prefix (``GSM1234_<name>``, ``V1_Breast-<name>``), as GEO and 10x's download pages name them.
    An exact name wins; two prefixed matches in one folder are refused (which sample is meant?)."""
    pattern = re.compile(rf"(?:.*[_.-])?{re.escape(name)}(?:\.gz)?")
    for folder in folders:
        if not folder.is_dir():
            continue
        for exact in (folder / name, folder / f"{name}.gz"):
            if exact.is_file():
                return exact
        found = sorted(p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name))
        if len(found) > 1:
            raise He2stError(f"several files could be {name}: {', '.join(p.name for p in found[:3])}; "
                             "give each sample its own folder", folder)
        if found:
            return found[0]
    return None


def join_barcodes(counts_ids: pd.Index, pos_ids: pd.Index, counts_file: Path, pos_file: Path) -> pd.Index:
    """Spot ids present in both the counts and the positions, in the counts' order; none in common is refused."""
    common = counts_ids.intersection(pos_ids, sort=False)
    if len(common) == 0:
        raise He2stError(
            f"no spot barcode in common with {pos_file} (counts: {counts_ids[0]!r}..., "
            f"positions: {pos_ids[0]!r}...)",
            counts_file,
        )
    return common


def sum_into_squares(counts: sp.spmatrix | np.ndarray, xy_px: np.ndarray, genes: list[str], side_px: float,
                     min_members: float, members_name: str, where: Path) -> ad.AnnData:
    """Counts of bins or cells at ``xy_px`` summed into a grid of squares of ``side_px`` (each member goes
    to the square holding its centre); squares with fewer than ``min_members`` members are dropped. The
    pseudo-spots sit at the squares' centres, with ``array_col``/``array_row`` and the member count
    (``obs[members_name]``, e.g. ``n_bins``)."""
    cells = np.floor(xy_px / side_px).astype(np.int64)
    keys, group = np.unique(cells, axis=0, return_inverse=True)
    group = group.ravel()
    members = sp.csr_matrix((np.ones(len(group), np.float32), (group, np.arange(len(group)))),
                            shape=(len(keys), len(group)))
    n_members = np.asarray(members.sum(axis=1)).ravel()
    keep = n_members >= min_members
    if not keep.any():
        raise He2stError(f"no pseudo-spot of {side_px:.0f} px has {min_members:g} or more members under tissue", where)
    adata = build_adata(members[keep] @ sp.csr_matrix(counts), [f"ps_{x}_{y}" for x, y in keys[keep]], genes,
                        (keys[keep] + 0.5) * side_px, where=where)
    adata.obs["array_col"], adata.obs["array_row"] = keys[keep, 0], keys[keep, 1]
    adata.obs[members_name] = n_members[keep].astype(np.int64)
    return adata


def image_source(image: str | Path | None) -> dict[str, str]:
    """The ``source`` entry of an image, for provenance (none for an expression-only section)."""
    return {} if image is None else {"image": str(image)}
