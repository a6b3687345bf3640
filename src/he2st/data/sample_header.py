"""What a he2st sample file says of itself, read from its HDF5 header without loading it.

``he2st info`` answers from this: the sample's metadata (``uns['he2st']``), its numbers of spots and genes,
its annotation columns and ``obsm`` keys, all read with h5py as the AnnData on-disk format (``.h5ad``)
lays them out. Loading the file through anndata would read the expression and, in an environment that
has dask and xarray (the SpatialData and squidpy extras), import them too: seconds for a command that
computes nothing. :class:`~he2st.data.sample.Sample` prints its summary through the same class, so both
say the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from he2st.errors import He2stError
from he2st.io import checked_h5ad, safe_name

if TYPE_CHECKING:
    import h5py

META_KEY = "he2st"
PLAIN_COLUMNS = ("in_tissue", "array_row", "array_col")  # spot-grid columns, not annotations


def id_from_file(value: object, what: str, path: str | Path) -> str:
    """An id read from a file's own metadata (a sample's ``uns``, HEST JSON), refused in one line naming the
    file when it is not a safe name: such ids name outputs, and ``../../x`` would write outside the folder."""
    try:
        return safe_name(str(value), what)
    except He2stError as exc:
        raise He2stError(exc.problem, path) from None


def is_missing(value: object) -> bool:
    """Whether a value read from a file's metadata gives nothing: None, NaN or blank text. JSON's ``NaN``
    (HEST's ``"patient": NaN``) and a table's empty cell both mean unknown; as an id, ``str`` would make
    them one patient ``'nan'`` shared by unrelated samples."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and not value.strip())


def not_a_sample(path: str | Path) -> He2stError:
    """The one line for an .h5ad without he2st's sample metadata."""
    return He2stError("not a he2st sample file (no uns['he2st']); use read_h5ad_sample for plain .h5ad", path)


def sample_fields(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """What a sample file's ``uns['he2st']`` says of its sample, as every reader of the file takes it: the
    ids (checked as output names), pixel and spot sizes, image, technology and dataset. A prediction (its
    ``uns['he2st']`` records a method, not a sample) or a file lacking a field is refused in one line."""
    missing = [k for k in ("sample_id", "patient_id", "pixel_size_um", "spot_diameter_um") if k not in meta]
    if missing:
        kind = ("a prediction, not a measured sample" if "target_transform" in meta
                else f"not a he2st sample file (uns['he2st'] lacks {', '.join(missing)})")
        raise He2stError(kind, path)
    return {
        "sample_id": id_from_file(meta["sample_id"], "sample id", path),
        "patient_id": id_from_file(meta["patient_id"], "patient id", path),
        "pixel_size_um": float(meta["pixel_size_um"]),
        "spot_diameter_um": float(meta["spot_diameter_um"]),
        "image_path": Path(meta["image_path"]) if meta.get("image_path") else None,
        "technology": str(meta.get("technology", "unknown")),
        "dataset": str(meta.get("dataset") or "") or None,
    }


@dataclass
class SampleHeader:
    """A sample's metadata and shape: everything ``he2st info`` prints but the image size."""

    sample_id: str
    patient_id: str
    dataset: str | None
    technology: str
    n_spots: int
    n_genes: int
    pixel_size_um: float
    spot_diameter_um: float
    image_path: Path | None
    obs_columns: list[str]
    obsm_keys: list[str]

    @classmethod
    def read(cls, path: str | Path) -> SampleHeader:
        """The header of the sample file ``path``; one line naming the file when it is not one."""
        import h5py

        path = checked_h5ad(path, "sample file")
        try:
            with h5py.File(path, "r") as fh:
                if f"uns/{META_KEY}" not in fh:
                    raise not_a_sample(path)
                meta = _scalars(fh[f"uns/{META_KEY}"])
                obs, var = fh["obs"], fh["var"]
                n_spots, n_genes = len(obs[obs.attrs["_index"]]), len(var[var.attrs["_index"]])
                columns = [_text(c) for c in obs.attrs.get("column-order", [])]
                obsm = sorted(fh["obsm"].keys()) if "obsm" in fh else []
        except OSError as exc:
            raise He2stError(f"not a readable .h5ad file ({' '.join(str(exc).split())})", path) from exc
        except KeyError as exc:
            raise He2stError(f"not a readable he2st sample file (missing {exc})", path) from exc
        return cls(**sample_fields(meta, path), n_spots=n_spots, n_genes=n_genes, obs_columns=columns,
                   obsm_keys=obsm)

    def summary(self, image_size: tuple[int, int] | None = None) -> dict[str, object]:
        """What ``he2st info`` prints; ``image_size`` (width, height) when the slide was opened (else it is
        opened here, reading its header only)."""
        info: dict[str, object] = {
            "sample": self.sample_id,
            "patient": self.patient_id,
            "dataset": self.dataset,
            "technology": self.technology,
            "spots": self.n_spots,
            "genes": self.n_genes,
            "pixel_size_um": round(self.pixel_size_um, 4),
            "spot_diameter_um": self.spot_diameter_um,
            "image": str(self.image_path) if self.image_path else None,
        }
        if self.image_path is not None:
            if image_size is None:
                from he2st.data.slide import open_slide

                with open_slide(self.image_path) as slide:
                    image_size = slide.dimensions
            info["image_size"] = "{}x{}".format(*image_size)
        extra = [c for c in self.obs_columns if c not in PLAIN_COLUMNS]
        if extra:
            info["annotations"] = ", ".join(extra)
        if self.obsm_keys:
            info["obsm"] = ", ".join(sorted(self.obsm_keys))
        return info


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalars(group: h5py.Group) -> dict[str, object]:
    """A dict group of scalars as anndata writes ``uns`` (strings, numbers; nested dicts are skipped)."""
    out: dict[str, object] = {}
    for key, item in group.items():
        if hasattr(item, "shape") and item.shape == ():
            value = item[()]
            out[key] = _text(value) if isinstance(value, bytes | str) else value.item()
    return out
