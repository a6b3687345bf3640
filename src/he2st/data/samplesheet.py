"""Sample sheets: a study's sections as one CSV (the nf-core convention), or found by walking a folder.

A sheet has one row per section with columns ``sample``, ``patient``, ``reader``, ``path``, ``image`` and
optionally ``pixel_size_um``, ``spots_file`` or any other field of a sample source (``bin_um``,
``alignment``, ...); relative paths are taken from the sheet's folder. Rows become the source dicts that
``data.samples`` of a prepare config accepts, so a sheet and a YAML list describe sections the same way.

:func:`discover_sources` finds, under a folder: Space Ranger ``outs/`` folders (``visium``; ``visium_hd``
when ``binned_outputs/`` is there), with the one slide image beside ``outs/`` when there is exactly one;
Visium sections as 10x's and GEO's download pages ship them (a ``*filtered_feature_bc_matrix.h5`` beside
``spatial/``, no ``outs/``: ``visium``, the image in the same folder); HEST-1k roots (``st/``, ``wsis/``,
``metadata/``: ``hest``; :func:`with_default_patients` takes each one's patient from its metadata); legacy
ST triples in one folder (a counts table, a spot file, an image sharing its first name part: ``st``); and
any other ``.h5ad`` (``h5ad``, pixel size from its Visium scale factors when it has them). Folders he2st
wrote into (work folders, predictions, exports: they hold its ``.he2st-output`` marker) are not searched,
nor the work folder being prepared: their ``.h5ad`` files are he2st's outputs, not sections, and a re-run
from the same folder must not find them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import pandas as pd

from he2st.data.readers.hest import metadata_patient, read_metadata
from he2st.data.readers.visium import full_resolution_pixel_um
from he2st.errors import He2stError, He2stWarning
from he2st.io import MARKER, name_from_stem, write_text_atomic

REQUIRED = ("sample", "reader", "path")
RENAMED = {"sample": "sample_id", "patient": "patient_id"}
PATH_FIELDS = ("path", "image", "spots_file", "alignment")
SHEET_ORDER = ("sample", "patient", "reader", "path", "image", "pixel_size_um", "spots_file")
SCALEFACTORS = ("scalefactors_json.json", "scalefactors_json.json.gz")  # Space Ranger's, maybe prefixed
#: images Space Ranger writes beside its outputs (downsampled copies, QC, CytAssist's capture): not the H&E
SPACE_RANGER_IMAGES = ("tissue_hires_image", "tissue_lowres_image", "aligned_fiducials", "detected_tissue_image",
                       "aligned_tissue_image", "cytassist_image")
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".jpg", ".jpeg", ".png", ".mrxs", ".scn")


def read_samplesheet(path: str | Path) -> list[dict[str, object]]:
    """The sheet's rows as source dicts (``sample`` -> ``sample_id``, ``patient`` -> ``patient_id``; empty
    cells left out; paths resolved against the sheet's folder)."""
    path = Path(path)
    if not path.exists():
        raise He2stError("sample sheet not found", path)
    try:
        # blank lines kept as rows, so that a row's line number is its index + 2 (the header is line 1)
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (OSError, ValueError) as exc:
        raise He2stError(f"not a readable CSV sample sheet ({type(exc).__name__})", path) from exc
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise He2stError(f"sample sheet lacks column(s) {', '.join(missing)} (needs sample, reader, path; "
                         "optional patient, image, pixel_size_um, spots_file)", path)
    sources = []
    lines: dict[str, int] = {}
    for i, row in enumerate(table.to_dict(orient="records"), start=2):
        if not any(str(value).strip() for value in row.values()):
            continue  # a blank line, or a row of empty cells as spreadsheets export
        source: dict[str, object] = {}
        for column, value in row.items():
            value = str(value).strip()
            if not value:
                continue
            key = RENAMED.get(column, column)
            source[key] = str(path.parent / value) if key in PATH_FIELDS and not os.path.isabs(value) else value
        for column in REQUIRED:
            if RENAMED.get(column, column) not in source:
                raise He2stError(f"line {i}: empty {column!r}", path)
        sample = str(source["sample_id"])
        if sample in lines:
            raise He2stError(f"line {i}: sample {sample!r} is listed again (first on line {lines[sample]}); "
                             "each row needs its own sample id", path)
        lines[sample] = i
        sources.append(source)
    if not sources:
        raise He2stError("sample sheet lists no samples", path)
    return sources


def with_default_patients(sources: list[dict[str, object]], where: str | Path) -> list[dict[str, object]]:
    """Sources whose patient is missing get their sample as patient, with one warning line (leave one
    patient out is then leave one sample out: sections of one patient would land on both sides). A HEST
    sample's patient is its metadata's, when the metadata name one."""
    sources = [s | {"patient_id": _hest_patient(s)} if s.get("reader") == "hest" and not s.get("patient_id") else s
               for s in sources]
    lacking = [s["sample_id"] for s in sources if not s.get("patient_id")]
    if lacking:
        warnings.warn(f"{where}: no patient for {len(lacking)} sample(s) ({', '.join(map(str, lacking[:3]))}"
                      f"{', ...' if len(lacking) > 3 else ''}): each is its own patient, so leave-one-patient-out "
                      "equals leave-one-sample-out", He2stWarning, stacklevel=2)
    return [s | {"patient_id": s.get("patient_id") or s["sample_id"]} for s in sources]


def write_samplesheet(path: str | Path, sources: Sequence[dict[str, object]]) -> Path:
    """The sources as a sheet :func:`read_samplesheet` reads back from anywhere (paths made absolute),
    columns in the usual order."""
    back = {v: k for k, v in RENAMED.items()}
    rows = [{back.get(k, k): ("" if v is None else os.path.abspath(v) if k in PATH_FIELDS else str(v))
             for k, v in s.items()} for s in sources]
    columns = [c for c in SHEET_ORDER if any(c in r for r in rows)]
    columns += sorted({c for r in rows for c in r} - set(columns))
    write_text_atomic(path, pd.DataFrame(rows, columns=columns).fillna("").to_csv(index=False))
    return Path(path)


# ----------------------------------------------------------------------------- discovery
def discover_sources(folder: str | Path, work_dir: str | Path | None = None) -> list[dict[str, object]]:
    """Every section found under ``folder`` (rules in the module docstring), sorted by path, outside
    ``work_dir`` and he2st's other output folders; a section whose image or pixel size could not be found is
    kept, with a warning line, for the user to fill in."""
    root = Path(folder)
    if not root.is_dir():
        raise He2stError("is a file, not a folder to search for samples" if root.exists()
                         else "folder to search for samples not found", root)
    work = None if work_dir is None else Path(work_dir).resolve()
    sources: list[dict[str, object]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _he2st_output(here / d, work))
        if (here.name == "outs" and (here / "spatial").is_dir()) or (here / "binned_outputs").is_dir():
            sources.append(_space_ranger(here))
            dirnames[:] = []  # nothing inside outs/ is a section of its own
        elif _visium_download(here, filenames):
            sources.append(_space_ranger(here))
            dirnames[:] = []
        elif all((here / d).is_dir() for d in ("st", "wsis", "metadata")):
            sources += [{"sample_id": p.stem, "reader": "hest", "path": str(here)}
                        for p in sorted((here / "st").glob("*.h5ad"))]
            dirnames[:] = []
        else:
            sources += _st_triples(here, sorted(filenames))
            sources += [_h5ad(here / f) for f in sorted(filenames) if f.endswith(".h5ad")]
    if not sources:
        raise He2stError("no Space Ranger outs/, HEST-1k root, legacy ST triple or .h5ad file found", root)
    ids = [s["sample_id"] for s in sources]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise He2stError(f"several sections would be named {duplicated[0]!r}; write a sample sheet with distinct "
                         "names instead", root)
    for s in sources:
        if s["reader"] in ("visium", "visium_hd", "st", "h5ad") and not s.get("image"):
            warnings.warn(f"{s['path']}: no single slide image found for sample {s['sample_id']}; fill in the "
                          "image column of the written sample sheet", He2stWarning, stacklevel=2)
        if s["reader"] == "h5ad" and not s.get("pixel_size_um"):
            warnings.warn(f"{s['path']}: no pixel size found for sample {s['sample_id']}; fill in pixel_size_um "
                          "of the written sample sheet", He2stWarning, stacklevel=2)
    return sources


def _he2st_output(folder: Path, work_dir: Path | None) -> bool:
    """Whether ``folder`` is ``work_dir`` or holds he2st's output marker (:data:`he2st.io.MARKER`)."""
    return (folder / MARKER).exists() or (work_dir is not None and folder.resolve() == work_dir)


def _images(folder: Path, prefix: str | None = None) -> list[Path]:
    """Image files of ``folder`` other than Space Ranger's own (:data:`SPACE_RANGER_IMAGES`); with ``prefix``,
    those whose first name part (:func:`_first_part`) it is."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(name in p.name for name in SPACE_RANGER_IMAGES)
                  and (prefix is None or _first_part(p.name) == prefix))


def _first_part(name: str) -> str:
    """A file name up to its first ``_`` or ``.``: ``A1`` of ``A1_selection.tsv`` and of ``A1.jpg``, not of
    ``A10.jpg``."""
    return name.split("_")[0].split(".")[0]


def _visium_download(folder: Path, files: list[str]) -> bool:
    """Whether ``folder`` holds a Visium section as 10x's and GEO's download pages ship it, without ``outs/``:
    one (maybe prefixed, maybe gzipped) ``filtered_feature_bc_matrix.h5`` or its folder, and scale factors in
    ``spatial/`` or beside it. A folder of several sections' files is left, with a warning, to a sample sheet."""
    names = [f for f in files if f.endswith(("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix.h5.gz"))]
    # sections are told apart by the prefix of their .h5; the matrix folder (unpacked without a prefix) is the
    # .h5's section, or the one section where there is no .h5
    matrices = sorted({name.split("filtered_feature_bc_matrix")[0] for name in names})
    if not matrices and (folder / "filtered_feature_bc_matrix").is_dir():
        matrices, names = [""], ["filtered_feature_bc_matrix/"]
    spatial = (folder / "spatial").is_dir() and any(f.name.endswith(SCALEFACTORS) for f in (folder / "spatial").iterdir())
    if not matrices or not (spatial or any(f.endswith(SCALEFACTORS) for f in files)):
        return False
    if len(matrices) > 1:
        warnings.warn(f"{folder}: Visium matrices of {len(matrices)} sections in one folder ({', '.join(names[:3])}); "
                      "list its sections in a sample sheet", He2stWarning, stacklevel=3)
        return False
    return True


def _hest_patient(source: dict[str, object]) -> str | None:
    """The patient a HEST sample's metadata names (None: none, or no readable metadata: the reader says why).
    A patient that is no safe id is refused here, in one line naming the metadata: left out, the sample would
    be its own patient and its patient's other sections would fall on both sides of a fold."""
    try:
        meta, where = read_metadata(Path(str(source["path"])), str(source["sample_id"]))
    except He2stError:
        return None
    return metadata_patient(meta, str(source["sample_id"]), where)


def _space_ranger(outs: Path) -> dict[str, object]:
    """A Space Ranger output folder; its slide image is the one image file beside ``outs/`` (Space Ranger's
    input), or in the folder itself for a section downloaded without ``outs/``."""
    sample = name_from_stem(outs.parent.name if outs.name == "outs" else outs.name)
    images = _images(outs.parent if outs.name == "outs" or (outs / "binned_outputs").is_dir() else outs)
    return {"sample_id": sample, "reader": "visium_hd" if (outs / "binned_outputs").is_dir() else "visium",
            "path": str(outs)} | ({"image": str(images[0])} if len(images) == 1 else {})


def _st_triples(folder: Path, files: list[str]) -> list[dict[str, object]]:
    """Legacy ST sections of one folder: a spot file (``*sel*.tsv`` such as ``A1_selection.tsv``, or
    ``*spot*.tsv``), the counts table sharing its first name part (a ``*.tsv``/``*.tsv.gz`` that is not a
    spot file) and the image likewise; a folder with one spot file takes its one table and one image."""
    tables = [f for f in files if f.endswith((".tsv", ".tsv.gz"))]
    spot_files = [f for f in tables if "sel" in f.lower() or "spot" in f.lower()]
    counts = [f for f in tables if f not in spot_files]
    out = []
    for spots in spot_files:
        prefix = _first_part(spots)
        alone = len(spot_files) == 1
        mine = counts if alone else [c for c in counts if _first_part(c) == prefix]
        images = _images(folder, None if alone else prefix)
        if len(mine) != 1:
            continue
        name = folder.name if alone else prefix
        out.append({"sample_id": name_from_stem(name), "reader": "st", "path": str(folder / mine[0]),
                    "spots_file": str(folder / spots)} | ({"image": str(images[0])} if len(images) == 1 else {}))
    return out


def _h5ad(path: Path) -> dict[str, object]:
    """A plain ``.h5ad``: the image sharing its stem beside it, µm/px from Visium scale factors if recorded,
    read as the ``visium`` reader reads them (:func:`~he2st.data.readers.visium.full_resolution_pixel_um`:
    ``microns_per_pixel``, else a theoretical 65 µm spot over ``spot_diameter_fullres``)."""
    source: dict[str, object] = {"sample_id": name_from_stem(path.stem), "reader": "h5ad", "path": str(path)}
    images = [p for p in _images(path.parent) if p.stem == path.stem]
    if len(images) == 1:
        source["image"] = str(images[0])
    try:
        libraries = ad.read_h5ad(path, backed="r").uns.get("spatial", {})
        factors = next(iter(libraries.values()))["scalefactors"] if len(libraries) == 1 else {}
        if factors.get("microns_per_pixel") or factors.get("spot_diameter_fullres"):
            source["pixel_size_um"] = full_resolution_pixel_um(factors, path)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader when it is prepared
        pass
    return source

