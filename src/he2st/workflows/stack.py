"""``he2st stack``: a 3D expression map from serial H&E sections.

Consecutive sections are registered (:mod:`he2st.predict.registration`), each onto the one before, and
the transforms chained so every section is placed in the first section's frame (µm). A hexagonal grid
over the union of the registered tissue outlines is the common grid; each section is predicted at the
grid points that fall on its own tissue (carried onto it by its transform) with the ordinary whole-slide
prediction, then all sections are written as one AnnData: ``obsm["spatial_3d"]`` = (x, y, z) µm in the
first section's frame, z = section index x spacing; ``obs["grid_id"]`` links a position across sections;
``uns["he2st_stack"]`` holds the transforms; ``--interpolate K`` adds K linearly interpolated planes
between adjacent sections at the grid points both carry.

Sections are slide images (pixel size from the file or ``mpp``) or prepared he2st samples (their image
and pixel size; their measured spots then allow :func:`evaluate_stack`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from he2st.data.genes import transform_counts
from he2st.data.patches import PatchSpec, check_resolution
from he2st.data.sample import Sample, build_adata
from he2st.data.slide import open_slide
from he2st.errors import He2stError
from he2st.evaluate.metrics import pearson_per_spot
from he2st.io import atomic_path, check_folder, check_output, make_folder, name_from_stem
from he2st.methods import Method
from he2st.predict import PredictConfig, run_prediction
from he2st.predict.grid import hex_grid
from he2st.predict.registration import Affine, Registration, SectionImage, register_sections, warp_mask
from he2st.predict.slide import select_genes
from he2st.predict.tissue import detect_tissue
from he2st.stats import pearson_per_gene

THUMB_UM_PER_PX = 20.0  # registration and tissue outline resolution: outline and coarse texture only
OUTPUTS = ("stack.h5ad", "stack.png", "stack.html", "stack_evaluation.json")  # in --out, beside sections/, grids/


@dataclass
class Section:
    """One input section: its image, pixel size, thumbnail and tissue, and its sample if it has one."""

    name: str
    path: Path
    image: Path
    mpp: float
    view: SectionImage
    sample: Sample | None = None


@dataclass
class StackResult:
    adata: ad.AnnData
    path: Path
    sections: list[Section]
    registrations: list[Registration | None]  # onto the previous section; None for the first
    from_reference: list[Affine] = field(default_factory=list)  # first section's µm -> this section's µm


def load_section(path: Path, mpp: float | None = None) -> Section:
    """A slide image (``mpp`` or the file's pixel size) or a prepared he2st sample ``.h5ad``."""
    sample = Sample.load(path) if path.suffix == ".h5ad" else None
    image = path if sample is None else sample.image_path
    if image is None:
        raise He2stError("the sample has no H&E image to register", path)
    with open_slide(image) as slide:
        size = slide.dimensions
        px = sample.pixel_size_um if sample is not None else (mpp or slide.embedded_mpp)
        if px is None:
            raise slide.unknown_mpp()
        thumb, scale = slide.thumbnail(max(64, math.ceil(max(size) * px / THUMB_UM_PER_PX)))
    um_per_px = px / scale
    mask = detect_tissue(thumb, um_per_px, where=image)
    name = sample.sample_id if sample is not None else name_from_stem(path.stem)
    return Section(name, path, Path(image), float(px), SectionImage.from_rgb(thumb, mask, um_per_px), sample)


def place_sections(sections: list[Section], register: bool = True) -> tuple[list[Registration | None], list[Affine]]:
    """Register each section onto the previous one and chain: the first section's µm -> each section's µm."""
    registrations: list[Registration | None] = [None]
    chain = [Affine.identity()]
    for previous, section in pairwise(sections):
        reg = register_sections(previous.view, section.view) if register else None
        registrations.append(reg)
        chain.append(chain[-1].then(reg.affine) if reg is not None else chain[-1])
    return registrations, chain


def _tissue_box(section: Section, transform: Affine) -> np.ndarray:
    """Corners (µm, first section's frame) of a box holding the section's tissue once placed there."""
    ys, xs = np.nonzero(section.view.mask)
    s = section.view.um_per_px
    corners = np.array([[x, y] for x in (xs.min(), xs.max() + 1) for y in (ys.min(), ys.max() + 1)]) * s
    return transform.inverse()(corners)


def common_grid(sections: list[Section], chain: list[Affine], pitch_um: float) -> np.ndarray:
    """Hexagonal grid points (µm, first section's frame) over the union of all registered tissue outlines.

    The union is drawn on a canvas of the first section's pixels that reaches every placed section's tissue:
    a later section larger than the first, or placed partly beyond its image, keeps all its tissue."""
    ref = sections[0].view
    s = ref.um_per_px
    boxes = np.vstack([[[0.0, 0.0], [ref.mask.shape[1] * s, ref.mask.shape[0] * s]]]
                      + [_tissue_box(section, t) for section, t in zip(sections, chain, strict=True)
                         if section.view.mask.any()])
    lo_px = np.floor(boxes.min(axis=0) / s).astype(np.int64)  # canvas on the first section's pixel lattice
    hi_px = np.ceil(boxes.max(axis=0) / s).astype(np.int64)
    shape = (int(hi_px[1] - lo_px[1]), int(hi_px[0] - lo_px[0]))
    lo = lo_px * s
    to_ref = Affine(np.eye(2), lo)  # canvas µm -> first section's µm
    union = np.zeros(shape, dtype=bool)
    for section, transform in zip(sections, chain, strict=True):
        union |= warp_mask(section.view.mask, section.view.um_per_px, to_ref.then(transform), shape, s)
    grid = hex_grid(union, 1.0, pitch_um, s)  # mask px as "level-0" px of s µm
    return grid.xy * s + lo


def _on_tissue(section: Section, xy_um: np.ndarray) -> np.ndarray:
    px = np.floor(xy_um / section.view.um_per_px).astype(np.int64)
    h, w = section.view.mask.shape
    inside = (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < w) & (px[:, 1] < h)
    keep = np.zeros(len(xy_um), dtype=bool)
    keep[inside] = section.view.mask[px[inside, 1], px[inside, 0]]
    return keep


def _grid_sample(section: Section, ids: np.ndarray, xy_um: np.ndarray, pitch_um: float) -> Sample:
    """The section's grid points as a (count-less) sample, so the ordinary prediction runs at them."""
    names = [f"g{i}" for i in ids]
    adata = build_adata(sp.csr_matrix((len(ids), 1)), names, ["none"], xy_um / section.mpp)
    diameter = section.sample.spot_diameter_um if section.sample is not None else 0.55 * pitch_um
    return Sample(section.name, "stack", adata, section.mpp, diameter, technology="grid")  # image given apart


def _placed(section: Section, own_um: np.ndarray, method: Method, patch: PatchSpec,
            out: Path) -> tuple[Section, np.ndarray, np.ndarray]:
    """The section, the common grid in its frame and the grid points on its tissue, once what its prediction
    would refuse is known not to apply (no point on tissue, a resolution the model cannot read with its
    ``patch``, an output that is not he2st's): a stack stops before its first file, not part way."""
    ids = np.flatnonzero(_on_tissue(section, own_um))
    if len(ids) == 0:
        raise He2stError("no common grid point falls on this section's tissue", section.path)
    check_resolution(section.mpp, patch, section.image, PredictConfig().max_upsample, method.card.training_mpp,
                     option="--max-upsample", mpp_option="--mpp")
    check_output(out / "grids" / f"{section.name}.h5ad")
    check_output(out / "sections" / f"{section.name}.h5ad")
    return section, own_um, ids


def build_stack(paths: list[Path], spacing_um: float, method: Method, model: Path | None, out: Path,
                pitch_um: float = 100.0, interpolate: int = 0, mpp: float | None = None,
                genes: list[str] | None = None, register: bool = True, device: str = "auto",
                weights: Path | None = None) -> StackResult:
    """Register, predict each section on the common grid and write ``<out>/stack.h5ad``."""
    if len(paths) < 2:
        raise He2stError("a stack needs at least two sections")
    if not spacing_um > 0 or not pitch_um > 0 or interpolate < 0:
        raise He2stError("--spacing-um and --pitch-um must be positive and --interpolate at least 0")
    check_folder(out)  # before any work: outputs he2st did not write are refused
    for name in OUTPUTS:
        check_output(out / name)
    sections = [load_section(Path(p), mpp) for p in paths]
    names = [s.name for s in sections]
    if len(set(names)) < len(names):
        raise He2stError(f"two sections share a name ({', '.join(names)}); rename the files")
    registrations, chain = place_sections(sections, register)
    grid_um = common_grid(sections, chain, pitch_um)
    select_genes(method, genes)  # a gene the model does not return: refused before any file is written
    _, patch, _ = method.card.features(model)
    placed = [_placed(section, transform(grid_um), method, patch, out) for section, transform in
              zip(sections, chain, strict=True)]  # every section checked before any file is written
    blocks, meta = [], {}
    for k, (section, own_um, ids) in enumerate(placed):
        grids = make_folder(out / "grids")
        grid_path = _grid_sample(section, ids, own_um[ids], pitch_um).save(grids / f"{section.name}.h5ad")
        cfg = PredictConfig(model=model, slide=section.image, mpp=section.mpp, out=out / "sections",
                            spots_from=grid_path, library_id=section.name, genes=genes, device=device,
                            weights=weights)
        predicted = ad.read_h5ad(run_prediction(cfg, method))[[f"g{i}" for i in ids]]  # grid order
        meta = dict(predicted.uns.get("he2st", {}))
        obs = pd.DataFrame({"section": section.name, "section_index": k, "grid_id": ids,
                            "x_um": grid_um[ids, 0], "y_um": grid_um[ids, 1], "z_um": k * spacing_um,
                            "interpolated": False}, index=[f"{section.name}:{i}" for i in ids])
        blocks.append((np.asarray(predicted.X, dtype=np.float32), obs, list(predicted.var_names)))
    genes_out = blocks[0][2]
    blocks += _interpolated(blocks, interpolate)
    adata = ad.AnnData(X=np.concatenate([b[0] for b in blocks]), obs=pd.concat([b[1] for b in blocks]),
                       var=pd.DataFrame(index=pd.Index(genes_out, name="gene")))
    adata.obs["section"] = adata.obs["section"].astype("category")
    adata.obsm["spatial_3d"] = adata.obs[["x_um", "y_um", "z_um"]].to_numpy(np.float64)
    adata.obsm["spatial"] = adata.obs[["x_um", "y_um"]].to_numpy(np.float64)
    adata.uns["he2st"] = {k: meta[k] for k in ("target_transform", "method", "model") if k in meta}
    adata.uns["he2st_stack"] = _stack_meta(sections, registrations, chain, spacing_um, pitch_um, interpolate)
    path = out / "stack.h5ad"
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return StackResult(adata, path, sections, registrations, chain)


def _interpolated(blocks: list, k: int) -> list:
    """``k`` planes between each pair of adjacent sections: linear in z at the grid points both carry."""
    planes = []
    for (xa, oa, genes), (xb, ob, _) in pairwise(blocks):
        shared, ia, ib = np.intersect1d(oa["grid_id"], ob["grid_id"], return_indices=True)
        za, zb = float(oa["z_um"].iloc[0]), float(ob["z_um"].iloc[0])
        for j in range(1, k + 1):
            t = j / (k + 1)
            z = za + t * (zb - za)
            obs = oa.iloc[ia].copy()
            obs["section"] = f"{oa['section'].iloc[0]}~{ob['section'].iloc[0]}@{t:.2f}"
            obs["section_index"] = int(oa["section_index"].iloc[0])
            obs["z_um"], obs["interpolated"] = z, True
            obs.index = [f"{obs['section'].iloc[0]}:{i}" for i in shared]
            planes.append(((1 - t) * xa[ia] + t * xb[ib], obs, genes))
    return planes


def _stack_meta(sections: list[Section], registrations: list[Registration | None], chain: list[Affine],
                spacing_um: float, pitch_um: float, interpolate: int) -> dict:
    per_section = {}
    for section, reg, transform in zip(sections, registrations, chain, strict=True):
        entry = {"path": str(section.path.resolve()), "image": str(section.image.resolve()), "mpp": section.mpp,
                 "from_reference": transform.as_array()}
        if reg is not None:
            entry |= {"rigid": reg.rigid.as_array(), "affine": reg.affine.as_array(),
                      "dice_before": reg.dice_before, "dice_rigid": reg.dice_rigid, "dice_after": reg.dice_after,
                      "affine_kept": reg.affine_kept}
        per_section[section.name] = entry
    return {"sections": [s.name for s in sections], "spacing_um": float(spacing_um), "pitch_um": float(pitch_um),
            "interpolate": int(interpolate), "registered": any(r is not None for r in registrations),
            "transforms": per_section,
            "convention": "from_reference: 2x3 [A|t], first section's µm (x, y) -> this section's µm; "
                          "rigid/affine: previous section's µm -> this section's µm"}


def _measured(sample: Sample, genes: list[str]) -> np.ndarray:
    values = transform_counts(sample.adata.X, "log1p_cp10k")[:, sample.adata.var_names.get_indexer(genes)]
    return np.asarray(values.toarray(), dtype=np.float64)


def evaluate_stack(result: StackResult, match_um: float = 100.0) -> dict:
    """For sections that are he2st samples: per-section mean per-gene Pearson of the stack's prediction
    (nearest grid point) vs the measured spots, and for each adjacent pair the mean per-gene Pearson of
    measured expression at corresponding positions (each spot's nearest spot of the previous section
    within ``match_um``), with the registration and with none (raw slide coordinates).

    Agreement of a pair is ``profile_r``: the Pearson correlation, across genes, of the two spots'
    expression relative to their own section's mean profile, averaged over pairs (the shared average
    profile would otherwise make any pairing look alike); ``gene_r`` (per-gene Pearson across the
    pairs) is given too but depends on which region the matched spots happen to cover."""
    adata = result.adata[~result.adata.obs["interpolated"].to_numpy(bool)]
    per_section, pairs = {}, {}
    placed = {}
    for section, transform in zip(result.sections, result.from_reference, strict=True):
        if section.sample is None:
            continue
        genes = [g for g in adata.var_names if g in set(section.sample.adata.var_names)]
        own_um = section.sample.spatial * section.mpp
        placed[section.name] = (transform.inverse()(own_um), own_um, _measured(section.sample, genes), genes)
        rows = adata.obs["section"].to_numpy() == section.name
        dist, nearest = cKDTree(adata.obsm["spatial"][rows]).query(placed[section.name][0])
        ok = dist <= match_um
        pred = np.asarray(adata.X[rows][nearest[ok]], dtype=np.float64)[:, adata.var_names.get_indexer(genes)]
        r = pearson_per_gene(pred, placed[section.name][2][ok])
        per_section[section.name] = {"pearson_mean": float(np.nanmean(r)), "n_spots": int(ok.sum()),
                                     "n_genes": len(genes)}
    names = [s.name for s in result.sections if s.name in placed]
    for a, b in pairwise(names):
        pairs[f"{a}-{b}"] = {how: _pair_agreement(placed[a], placed[b], i, match_um)
                             for how, i in (("registered", 0), ("unregistered", 1))}
    return {"sections": per_section, "adjacent": pairs, "match_um": match_um}


def _pair_agreement(a: tuple, b: tuple, which: int, match_um: float) -> dict:
    genes = [g for g in a[3] if g in set(b[3])]
    dist, nearest = cKDTree(a[which]).query(b[which])
    ok = dist <= match_um
    if ok.sum() < 10:
        return {"profile_r": float("nan"), "gene_r": float("nan"), "n_pairs": int(ok.sum())}
    xa = a[2][:, [a[3].index(g) for g in genes]]
    xb = b[2][:, [b[3].index(g) for g in genes]]
    pa, pb = xa[nearest[ok]], xb[ok]
    profile = pearson_per_spot(pa - xa.mean(axis=0), pb - xb.mean(axis=0))
    return {"profile_r": float(np.nanmean(profile)), "gene_r": float(np.nanmean(pearson_per_gene(pa, pb))),
            "n_pairs": int(ok.sum()), "distance_um": float(dist[ok].mean())}
