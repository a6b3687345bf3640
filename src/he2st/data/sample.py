"""The one object per tissue section that every he2st step passes around.

A :class:`Sample` owns the spot-level AnnData (counts, spot centres, annotations) and knows its
slide, pixel size, spot size and patient. Readers for each technology build it; ``save``/``load``
persist it as a single ``.h5ad`` so later steps never re-parse raw Space Ranger/ST files.

Conventions (as scanpy/squidpy/HEST): ``adata.obsm["spatial"]`` holds spot centres as (x, y) =
(column, row) in level-0 pixels of the slide; ``adata.X`` holds raw counts (spots x genes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.data.sample_header import META_KEY, SampleHeader, not_a_sample, sample_fields
from he2st.data.slide import Slide, open_slide
from he2st.errors import He2stError, He2stWarning
from he2st.io import atomic_path, read_h5ad_checked

HIRES_PX = 2000  # long side of the hires image in uns["spatial"] (Space Ranger's tissue_hires_image)
VISIUM_SPOT_UM = 55.0  # a Visium spot's diameter
#: what ``spot_diameter_fullres`` spans: Space Ranger's scale factors measure a theoretical 65 µm spot (the
#: physical spot is 55 µm across), as CellChat and other readers of ``scalefactors_json.json`` take it
SCALEFACTOR_SPOT_UM = 65.0


@dataclass
class Sample:
    """A tissue section: spot counts + coordinates + the H&E it was measured on."""

    sample_id: str
    patient_id: str
    adata: ad.AnnData
    pixel_size_um: float
    spot_diameter_um: float
    image_path: Path | None = None
    technology: str = "unknown"
    dataset: str | None = None
    source: dict[str, str] = field(default_factory=dict)  # file role -> path, for provenance
    _slide: Slide | None = field(default=None, init=False, repr=False)

    # ----------------------------------------------------------------- properties
    @property
    def n_spots(self) -> int:
        return self.adata.n_obs

    @property
    def n_genes(self) -> int:
        return self.adata.n_vars

    @property
    def spatial(self) -> np.ndarray:
        """Spot centres (n, 2) as (x, y) level-0 px."""
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def slide(self) -> Slide:
        """The H&E, opened on first use (reading a slide header is cheap, pixels are read on demand)."""
        self.require_image()
        if self._slide is None:
            self._slide = open_slide(self.image_path)
        return self._slide

    def require_image(self) -> None:
        """One line naming the sample's counts file (for Visium, inside its ``outs/``) when it has no H&E: an
        expression-only section has nothing to cut patches from or predict on."""
        if self.image_path is None:
            raise He2stError(f"sample {self.sample_id} has no image (expression-only section); give the H&E it "
                             "was measured on as its image", self.source.get("counts") or self.sample_id)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    # ----------------------------------------------------------------- checks
    def validate(self, check_image: bool = True) -> None:
        """Refuse samples that later steps would silently mishandle; errors name the offending file."""
        where = self.source.get("counts") or self.sample_id
        if self.adata.n_obs == 0:
            raise He2stError(f"sample {self.sample_id} has no spots under tissue", where)
        if self.adata.obs_names.has_duplicates:
            dup = self.adata.obs_names[self.adata.obs_names.duplicated()][0]
            raise He2stError(f"duplicate spot barcode {dup!r}", where)
        if "spatial" not in self.adata.obsm:
            raise He2stError("no spot coordinates (obsm['spatial'])", where)
        if not np.isfinite(self.spatial).all():
            raise He2stError("spot coordinates contain NaN or infinite values", self.source.get("positions", where))
        if not (np.isfinite(self.pixel_size_um) and self.pixel_size_um > 0):
            raise He2stError(f"pixel size must be a positive number of µm/px, got {self.pixel_size_um}", where)
        if check_image and self.image_path is not None:
            w, h = self.slide.dimensions
            xy = self.spatial
            off = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
            if off.any():
                first = self.adata.obs_names[np.argmax(off)]
                raise He2stError(
                    f"{int(off.sum())} spot(s) lie off the {w}x{h} image (first: {first} at "
                    f"x={xy[off][0, 0]:.0f}, y={xy[off][0, 1]:.0f}); wrong image or coordinate scale?",
                    self.image_path,
                )

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the sample as one ``.h5ad`` (metadata in ``uns['he2st']``), atomically."""
        path = Path(path)
        adata = self.adata.copy()
        adata.uns[META_KEY] = {
            "sample_id": self.sample_id,
            "patient_id": self.patient_id,
            "pixel_size_um": float(self.pixel_size_um),
            "spot_diameter_um": float(self.spot_diameter_um),
            "image_path": "" if self.image_path is None else str(Path(self.image_path).resolve()),
            "technology": self.technology,
            "dataset": self.dataset or "",
            "source": dict(self.source),
        }
        if self.image_path is not None:  # the scverse layout, so squidpy/scanpy plot the measured counts on the H&E
            thumb, scale = self.slide.thumbnail(HIRES_PX)
            library = spatial_library(thumb, scale, scalefactor_spot_px(self.spot_diameter_um, self.pixel_size_um),
                                      str(Path(self.image_path).resolve()), "he2st prepare")
            library["scalefactors"]["microns_per_pixel"] = float(self.pixel_size_um)
            adata.uns["spatial"] = {self.sample_id: library}
        with atomic_path(path, suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Sample:
        path = Path(path)
        adata = read_h5ad_checked(path, "sample file")
        meta = adata.uns.pop(META_KEY, None)
        if meta is None:
            raise not_a_sample(path)
        return cls(**sample_fields(meta, path), adata=adata,
                   source={str(k): str(v) for k, v in dict(meta.get("source", {})).items()})

    def summary(self) -> dict[str, object]:
        """What ``he2st info`` prints (as :class:`~he2st.data.sample_header.SampleHeader` reads it from a file)."""
        header = SampleHeader(
            sample_id=self.sample_id, patient_id=self.patient_id, dataset=self.dataset, technology=self.technology,
            n_spots=self.n_spots, n_genes=self.n_genes, pixel_size_um=self.pixel_size_um,
            spot_diameter_um=self.spot_diameter_um, image_path=self.image_path,
            obs_columns=list(self.adata.obs.columns), obsm_keys=list(self.adata.obsm.keys()))
        return header.summary(self.slide.dimensions if self.image_path is not None else None)


def scalefactor_spot_px(spot_diameter_um: float, pixel_size_um: float) -> float:
    """``spot_diameter_fullres`` of a sample file as Space Ranger defines it, so that readers of the file take
    the right µm/px from it. For a Visium spot (55 µm): the pixels a theoretical 65 µm spot spans, as readers
    of Visium scale factors take µm/px as 65 / ``spot_diameter_fullres`` (he2st's own ``--from-dir`` too);
    for any other spot (a Visium HD bin, a legacy ST spot, a pseudo-spot or cell): its own diameter, as
    Space Ranger writes a Visium HD bin's, beside ``microns_per_pixel`` (which he2st writes for every
    sample, and which ``--from-dir`` reads first). he2st's steps read a prepared sample's µm/px from
    ``uns['he2st']``, not from these."""
    visium = math.isclose(spot_diameter_um, VISIUM_SPOT_UM, rel_tol=1e-6)
    return (SCALEFACTOR_SPOT_UM if visium else spot_diameter_um) / pixel_size_um


def spatial_library(hires: np.ndarray, scale: float, spot_diameter_px: float, image: str, software: str) -> dict:
    """One library of ``uns["spatial"]`` as squidpy and scanpy read it: the hires image (``scale`` hires px per
    level-0 px, the frame of ``obsm["spatial"]``) and the spot diameter in level-0 px."""
    return {
        "images": {"hires": np.ascontiguousarray(hires, dtype=np.uint8)},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(spot_diameter_px)},
        "metadata": {"source_image_path": image, "software": software},
    }


def build_adata(
    counts: sp.spmatrix | np.ndarray, barcodes: list[str], genes: list[str], spatial_xy: np.ndarray,
    where: str | Path | None = None,
) -> ad.AnnData:
    """Assemble a counts AnnData with the scverse spatial convention, counts stored sparse. Every reader ends
    here, so this is where counts are checked: a NaN, infinite or negative count is refused naming ``where``
    (the file) and its first spot and gene. Duplicate gene names are made unique the scanpy way (``G``,
    ``G-1``), with a warning naming the file."""
    matrix = sp.csr_matrix(counts, dtype=np.float32)
    _refuse_bad_counts(matrix, barcodes, genes, where)
    _warn_if_not_whole(matrix, where)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Variable names are not unique")  # handled below, naming the file
        adata = ad.AnnData(
            X=matrix,
            obs=pd.DataFrame(index=pd.Index([str(b) for b in barcodes], name="barcode")),
            var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")),
        )
    adata.obsm["spatial"] = np.asarray(spatial_xy, dtype=np.float64)
    if adata.var_names.has_duplicates:
        dupes = sorted(set(adata.var_names[adata.var_names.duplicated()]))
        warnings.warn(f"{where or 'counts'}: duplicate gene name(s) {', '.join(dupes[:5])}"
                      f"{' ...' if len(dupes) > 5 else ''} made unique the scanpy way (G, G-1, ...)",
                      He2stWarning, stacklevel=2)
        adata.var_names_make_unique()
    return adata


def _warn_if_not_whole(matrix: sp.csr_matrix, where: str | Path | None) -> None:
    """A warning naming the file when counts are not whole numbers: he2st normalises raw counts itself (to the
    library size, then log1p), so values already normalised or log-transformed would be transformed twice.
    Not refused: some corrected counts (ambient-RNA removal) are fractional and still counts."""
    fractional = matrix.data != np.round(matrix.data)
    if fractional.any():
        warnings.warn(f"{where or 'counts'}: {fractional.mean():.0%} of the non-zero counts are not whole numbers "
                      f"(e.g. {matrix.data[fractional][0]:.4g}); he2st expects raw counts and normalises them itself "
                      "(an .h5ad may keep them in layers['counts'])", He2stWarning, stacklevel=3)


def _refuse_bad_counts(matrix: sp.csr_matrix, barcodes: list[str], genes: list[str], where: str | Path | None) -> None:
    """Raise on the first (spot, gene) whose count is not a finite non-negative number: normalisation and
    every loss would turn one NaN into a NaN model, long after the file that held it is out of sight."""
    bad = ~np.isfinite(matrix.data) | (matrix.data < 0)
    if not bad.any():
        return
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))[bad]
    cols = matrix.indices[bad]
    first = np.lexsort((cols, rows))[0]
    value = matrix.data[bad][first]
    raise He2stError(f"count {value} for gene {str(genes[cols[first]])!r} at spot {str(barcodes[rows[first]])!r}: "
                     f"counts must be finite and non-negative ({int(bad.sum())} bad in all)", where)
