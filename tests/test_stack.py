"""``he2st stack``: registration of serial sections, prediction on one common grid, the 3D AnnData and views.

Synthetic sections: one irregular piece of tissue (pink, with nuclei-like dots and purple glands), the
later sections the same tissue turned and shifted by known amounts, written as pyramidal TIFFs with
their pixel size. A tiny random ViT and a kNN model keep the end-to-end run to seconds. The her2st
test (slow) stacks patient C's five imaged serial sections with a ridge model trained on patients A and B.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from in_process import run_cli
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from synthetic import write_pyramid

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.spots import SpotSet
from he2st.encoders import create
from he2st.errors import He2stError
from he2st.methods import ModelCard, create_method
from he2st.predict.registration import Affine, register_sections
from he2st.report.stack_view import write_stack_html
from he2st.workflows.stack import load_section

MPP = 1.0
SIDE = 2000
GENES = [f"G{i}" for i in range(6)]
# first section's µm -> each section's µm: rotation (degrees) and shift (µm)
MOVES = [(0.0, (0.0, 0.0)), (12.0, (240.0, -160.0)), (-8.0, (60.0, 110.0))]


def _tissue(seed: int = 0) -> np.ndarray:
    """An irregular quadrilateral of tissue with texture (no symmetry a registration could confuse)."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (SIDE, SIDE), 0)
    ImageDraw.Draw(mask).polygon([(420, 700), (1500, 380), (1620, 1450), (760, 1640)], fill=255)
    inside = np.asarray(mask) > 0
    img = np.full((SIDE, SIDE, 3), 242, dtype=np.uint8)
    img[inside] = (205, 130, 195)
    for cy, cx in rng.integers(500, 1500, (14, 2)):  # glands: larger purple blobs
        yy, xx = np.ogrid[:SIDE, :SIDE]
        img[inside & ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(40, 90) ** 2)] = (120, 70, 160)
    ys, xs = rng.integers(0, SIDE, 9000), rng.integers(0, SIDE, 9000)
    keep = inside[ys, xs]
    for y, x in zip(ys[keep], xs[keep], strict=True):
        img[y - 2 : y + 3, x - 2 : x + 3] = (70, 40, 120)
    return img


def _truth(angle: float, shift: tuple[float, float]) -> Affine:
    a = np.radians(angle)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([SIDE / 2, SIDE / 2]) * MPP  # turned about the field's centre
    return Affine(rotation, centre - rotation @ centre + np.asarray(shift))


def _moved(image: np.ndarray, move: Affine) -> np.ndarray:
    """The section whose µm point ``move(x)`` shows what the first section shows at ``x``."""
    inverse = move.inverse()
    swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
    matrix, offset = swap @ inverse.matrix @ swap, swap @ inverse.offset / MPP
    return np.stack([ndi.affine_transform(image[..., c], matrix, offset, order=1, cval=242) for c in range(3)],
                    axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sections")
    base = _tissue()
    return [write_pyramid(root / f"s{k}.tif", _moved(base, _truth(*move)), MPP) for k, move in enumerate(MOVES)]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create("test_vit", pretrained=False)


@pytest.fixture(scope="module")
def model(encoder, tmp_path_factory) -> tuple[Path, Path]:
    """A kNN model over random training spots (features of the tiny encoder) and the encoder's weights."""
    rng = np.random.default_rng(0)
    n = 60
    method = create_method("knn", top_k=5)
    method.card = ModelCard(method="knn", panel=GenePanel(genes=GENES), encoder=encoder.spec, patch=PatchSpec(),
                            embedding=EmbedConfig(encoder=encoder.spec.name))
    features = rng.normal(size=(n, encoder.embed_dim)).astype(np.float32)
    method.fit(SpotSet(np.array(["T"] * n, dtype=object), np.array([f"b{i}" for i in range(n)], dtype=object),
                       features, np.zeros((n, 2)), GENES, rng.gamma(2, 1, (n, len(GENES))).astype(np.float32)))
    root = tmp_path_factory.mktemp("model")
    torch.save(encoder.backbone.state_dict(), root / "test_vit.pth")
    return method.save(root / "knn.pt"), root / "test_vit.pth"


def test_registration_recovers_the_known_turn_and_shift(sections):
    fixed, moving = load_section(sections[0]), load_section(sections[1])
    reg = register_sections(fixed.view, moving.view)
    points = np.argwhere(fixed.view.mask)[::50][:, ::-1] * fixed.view.um_per_px  # tissue points, µm
    error = np.linalg.norm(reg.affine(points) - _truth(*MOVES[1])(points), axis=1)
    assert error.max() < 2 * fixed.view.um_per_px, error.max()  # within two thumbnail pixels (40 µm)
    assert np.degrees(np.arctan2(reg.rigid.matrix[1, 0], reg.rigid.matrix[0, 0])) == pytest.approx(12, abs=1.5)
    assert reg.dice_before < 0.8 and reg.dice_after > 0.95


def test_registration_frame_is_the_pixel_square_frame():
    """A thumbnail turned 180° maps (x, y) µm to (w s - x, h s - y) µm when a pixel is the square [c s, (c+1) s)
    (the frame of warp_mask, the stack's grid and the slides): no half-pixel offset from SimpleITK's centres."""
    from he2st.predict.registration import SectionImage

    h, w, s = 60, 80, 20.0
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx - 30) ** 2 / 400 + (yy - 25) ** 2 / 150 < 1) | ((xx > 40) & (xx < 65) & (yy > 20) & (yy < 45))
    grey = np.where(mask, 0.3 + 0.5 * np.sin(xx / 3.0) * np.cos(yy / 4.0) ** 2, 0).astype(np.float32)
    fixed = SectionImage(mask, grey, s)
    turned = SectionImage(mask[::-1, ::-1].copy(), grey[::-1, ::-1].copy(), s)
    reg = register_sections(fixed, turned)
    points = np.array([[300.0, 500.0], [1000.0, 200.0], [600.0, 600.0]])
    expected = np.array([w * s, h * s]) - points
    assert np.abs(reg.rigid(points) - expected).max() < 1.0, reg.rigid(points) - expected
    assert reg.dice_rigid > 0.99


def test_common_grid_covers_tissue_beyond_the_first_sections_image():
    """A second section twice the first's size, or shifted partly off its image: the grid covers all of its
    tissue (drawn on the first section's canvas alone, it stopped at that image's edge, 1000 µm here)."""
    from he2st.predict.registration import SectionImage
    from he2st.workflows.stack import Section, common_grid

    small, large = np.zeros((50, 50), bool), np.zeros((100, 100), bool)
    small[10:40, 10:40], large[10:90, 10:90] = True, True  # tissue at 200-800 µm and 200-1800 µm (20 µm/px)
    sections = [Section(n, Path(n), Path(n), 1.0, SectionImage(m, m.astype(np.float32), 20.0))
                for n, m in (("a", small), ("b", large))]
    grid = common_grid(sections, [Affine.identity(), Affine.identity()], 100.0)
    assert grid.max(axis=0).min() > 1700 and grid.min(axis=0).min() > 200
    shifted = common_grid(sections, [Affine.identity(), Affine(np.eye(2), np.array([600.0, 0.0]))], 100.0)
    assert shifted[:, 0].min() < -300 and shifted[:, 0].max() > 1100  # b's tissue at -400..1200 µm in a's frame


def test_stack_page_leaves_points_without_a_value_undrawn(tmp_path):
    n = 40
    values = np.linspace(1.0, 5.0, n * 2, dtype=np.float32).reshape(n, 2)
    values[:10, 1] = np.nan  # e.g. a gene no section's measurement covers there
    adata = ad.AnnData(values, var=pd.DataFrame(index=["A", "B"]))
    adata.obsm["spatial_3d"] = np.c_[np.arange(n) * 10.0, np.arange(n) * 5.0, np.repeat([0.0, 10.0], n // 2)]
    adata.obs["interpolated"] = False
    page = write_stack_html(adata, tmp_path / "stack.html", ["A", "B"]).read_text()
    data = json.loads(re.search(r"const D=(.*?);\n", page).group(1).replace("<\\/", "</"))
    assert data["v"][1][:10] == [None] * 10  # not 0, the colour of the lowest expression
    assert data["v"][1][10] == 0 and data["v"][1][-1] == 255 and data["v"][0][0] == 0
    assert "if(v===null)continue" in page


def test_stack_end_to_end(sections, model, tmp_path):
    model_path, weights = model
    out = tmp_path / "stack"
    result = run_cli("stack", *sections, "--spacing-um", "10", "--model", model_path, "--out", out, "--pitch-um",
                     "150", "--interpolate", "2", "--weights", weights, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "registered" in result.stdout
    adata = ad.read_h5ad(out / "stack.h5ad")
    xyz = adata.obsm["spatial_3d"]
    real = ~adata.obs["interpolated"].to_numpy(bool)
    assert sorted(set(np.round(xyz[real, 2], 3))) == [0.0, 10.0, 20.0]
    assert np.allclose(sorted(set(np.round(xyz[~real, 2], 2))), [3.33, 6.67, 13.33, 16.67])
    # each section placed by a transform close to the truth (first section's µm -> its own µm)
    info = adata.uns["he2st_stack"]
    for name, move in zip(info["sections"], MOVES, strict=True):
        placed = np.asarray(info["transforms"][name]["from_reference"])
        points = adata.obsm["spatial"][adata.obs["section"].to_numpy() == name]
        error = np.linalg.norm(Affine(placed[:, :2], placed[:, 2])(points) - _truth(*move)(points), axis=1)
        assert error.max() < 60, (name, error.max())
    # the same grid point shows the same tissue on every section: predictions agree far better than chance
    first, second = (adata[(adata.obs["section"] == n).to_numpy()] for n in info["sections"][:2])
    shared = np.intersect1d(first.obs["grid_id"], second.obs["grid_id"])
    assert len(shared) > 0.8 * min(first.n_obs, second.n_obs)
    a = np.asarray(first[first.obs["grid_id"].isin(shared).to_numpy()].X)
    b = np.asarray(second[second.obs["grid_id"].isin(shared).to_numpy()].X)
    same = np.mean(np.abs(a - b))
    shuffled = np.mean(np.abs(a - b[np.random.default_rng(0).permutation(len(b))]))
    assert same < 0.8 * shuffled, (same, shuffled)
    # an interpolated plane lies between its two sections at every shared grid point
    plane = adata[(adata.obs["section"] == f"{info['sections'][0]}~{info['sections'][1]}@0.33").to_numpy()]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    assert plane.n_obs == len(shared) and np.all((plane.X >= lo - 1e-5) & (plane.X <= hi + 1e-5))
    page = (out / "stack.html").read_text()
    assert "<canvas" in page and "http" not in page.replace("http-equiv", "")
    data = json.loads(page.split("const D=")[1].split(";\n")[0])
    assert len(data["x"]) == adata.n_obs and len(data["v"][0]) == adata.n_obs
    assert Image.open(out / "stack.png").size[0] > 400


def test_bad_stacks_are_one_error_line(sections, model, tmp_path, monkeypatch):
    model_path, _ = model
    result = run_cli("stack", sections[0], "--spacing-um", "10", "--model", model_path, "--out", tmp_path / "a")
    assert result.returncode == 2 and "at least two sections" in result.stderr
    png = tmp_path / "plain.png"
    Image.open(sections[0]).convert("RGB").resize((500, 500)).save(png)
    result = run_cli("stack", png, sections[1], "--spacing-um", "10", "--model", model_path, "--out", tmp_path / "b")
    assert result.returncode == 2 and "plain.png" in result.stderr and "--mpp" in result.stderr
    # a refusal the prediction would make (a gene the model does not return) stops the stack before its first file
    result = run_cli("stack", *sections, "--spacing-um", "10", "--model", model_path, "--out", tmp_path / "c",
                     "--genes", "NOT_A_GENE", "--pitch-um", "150", "--device", "cpu")
    assert result.returncode == 2 and "NOT_A_GENE" in result.stderr, result.stderr
    assert not (tmp_path / "c" / "grids").exists() and not (tmp_path / "c" / "sections").exists()
    # a gene to show that the stack does not predict: refused before any work, not swapped for another
    result = run_cli("stack", *sections, "--spacing-um", "10", "--model", model_path, "--out", tmp_path / "d",
                     "--show", "NOT_A_GENE", "--pitch-um", "150", "--device", "cpu")
    assert result.returncode == 2 and "--show NOT_A_GENE: not among the genes" in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(He2stError, match=r"he2st\[registration\]"):
        register_sections(load_section(sections[0]).view, load_section(sections[1]).view)


@pytest.mark.slow
def test_her2st_patient_c_stack_with_a_model_of_patients_a_and_b(prepared, tmp_path):
    """C2-C6 (serial sections of one tumour) with ridge_cv trained on A1 and B4: every section predicted
    above chance, registration recovers the outline, and measured expression of adjacent sections agrees
    better at registered positions than at the raw slide positions."""
    model = tmp_path / "ridge_cv_AB.pt"
    trained = run_cli("train", "-w", prepared, "--method", "ridge_cv", "--samples", "A1,B4", "--out", model)
    assert trained.returncode == 0, trained.stderr
    samples = [prepared / "samples" / f"C{i}.h5ad" for i in range(2, 7)]
    out = tmp_path / "stack"
    result = run_cli("stack", *samples, "--spacing-um", "16", "--model", model, "--out", out, "--interpolate", "1",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    info = ad.read_h5ad(out / "stack.h5ad").uns["he2st_stack"]["transforms"]
    for name in ("C3", "C4", "C5", "C6"):
        assert info[name]["dice_after"] > 0.9 > info[name]["dice_before"]
    scores = json.loads((out / "stack_evaluation.json").read_text())
    for name, s in scores["sections"].items():
        assert s["pearson_mean"] > 0.07 and s["n_spots"] > 170, (name, s)
    registered = [p["registered"]["profile_r"] for p in scores["adjacent"].values()]
    unregistered = [p["unregistered"]["profile_r"] for p in scores["adjacent"].values()]
    assert all(r > u for r, u in zip(registered, unregistered, strict=True)), scores["adjacent"]
    assert np.mean(registered) > np.mean(unregistered) + 0.04
