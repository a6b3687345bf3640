"""The her2st dataset (Andersson et al. 2021) as he2st samples.

36 sections from 8 patients (the letter is the patient). Seven have an H&E in the public copy:
A1 (a 0.2876x downscaled PNG), B4 and C2-C6 (full resolution JPEGs). The other 29 are
expression-only: useful as retrieval references and for gene statistics, never as image data.
"""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from he2st.data.datasets import dataset_dir
from he2st.data.readers.st import read_st
from he2st.data.sample import Sample
from he2st.errors import He2stError

SECTIONS: tuple[str, ...] = tuple(
    f"{p}{i}" for p, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True) for i in range(1, n + 1)
)
# section -> (image path relative to the dataset root, factor from spot-file pixels to image pixels)
IMAGES: dict[str, tuple[str, float]] = {
    "A1": ("app/www/imgs/A1_HE_image_dark.png", 2000 / 6954),
    "B4": ("data/ST-imgs/B/B4/BT10737_D2_HE.jpg", 1.0),
    "C2": ("data/ST-imgs/C/C2/5714_HE_BT_C2.jpg", 1.0),
    "C3": ("data/ST-imgs/C/C3/5714_HE_BT_D1.jpg", 1.0),
    "C4": ("data/ST-imgs/C/C4/5714_HE_BT_D2.jpg", 1.0),
    "C5": ("data/ST-imgs/C/C5/5714_HE_BT_E1.jpg", 1.0),
    "C6": ("data/ST-imgs/C/C6/5714_HE_BT_E2.jpg", 1.0),
}
IMAGED_SECTIONS: tuple[str, ...] = tuple(IMAGES)
CELLTYPE_LEVELS = ("major", "minor")


def patient_of(section: str) -> str:
    return section[0]


def load_section(section: str, root: str | Path | None = None, with_image: bool = True) -> Sample:
    """One her2st section with counts, spot centres, labels (where annotated) and cell-type proportions."""
    if section not in SECTIONS:
        raise He2stError(f"unknown her2st section {section!r}; sections are {SECTIONS[0]}..{SECTIONS[-1]}")
    root = Path(root) if root is not None else dataset_dir("her2st")
    image, scale = (None, 1.0)
    if with_image:
        if section not in IMAGES:
            raise He2stError(f"her2st section {section} has no H&E image (imaged: {', '.join(IMAGED_SECTIONS)})")
        rel, scale = IMAGES[section]
        image = root / rel
    sample = read_st(
        root / "data" / "ST-cnts" / f"{section}.tsv.gz",
        root / "data" / "ST-spotfiles" / f"{section}_selection.tsv",
        image,
        sample_id=section,
        patient_id=patient_of(section),
        image_scale=scale,
        dataset="her2st",
    )
    _add_labels(sample, root / "data" / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv")
    for level in CELLTYPE_LEVELS:
        zip_path = root / "res" / "ST-deconv" / "props" / f"{level}.zip"
        if zip_path.exists():
            props = _proportions(str(zip_path), level).get(section)
            if props is not None:
                aligned = props.reindex(sample.adata.obs_names)
                sample.adata.obsm[f"celltype_{level}"] = aligned.fillna(0.0).astype(np.float32)
    return sample


def load_her2st(
    sections: list[str] | tuple[str, ...] | None = None, root: str | Path | None = None, with_image: bool = True
) -> list[Sample]:
    """Several sections (default: the seven with an image)."""
    return [load_section(s, root, with_image) for s in (sections or IMAGED_SECTIONS)]


def _add_labels(sample: Sample, path: Path) -> None:
    """Pathologist region labels; their (x, y) are the refined array coordinates of the spot file."""
    if not path.exists():
        return
    labels = pd.read_csv(path, sep="\t").dropna(subset=["x", "y"])  # F1 has a labelled row without coordinates
    ids = np.round(labels["x"]).astype(int).astype(str) + "x" + np.round(labels["y"]).astype(int).astype(str)
    region = pd.Series(labels["label"].to_numpy(), index=ids)
    region = region[~region.index.duplicated()]
    sample.adata.obs["region"] = pd.Categorical(region.reindex(sample.adata.obs_names).fillna("unlabelled"))


@lru_cache(maxsize=4)
def _proportions(zip_path: str, level: str) -> dict[str, pd.DataFrame]:
    """All sections' stereoscope proportions from one archive, read once."""
    out: dict[str, pd.DataFrame] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.endswith("-proportion.tsv"):
                section = Path(name).name.split("-")[0]
                table = pd.read_csv(io.BytesIO(zf.read(name)), sep="\t", index_col=0)
                table.index = table.index.astype(str)
                # HDF5 forbids "/" in names ("CAFs MSC/iCAF-like"); keep the label readable.
                table.columns = [c.replace("/", "-") for c in table.columns]
                out[section] = table
    return out
