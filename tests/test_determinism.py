"""Same input and seed, same output: every randomised step run twice and compared.

Registration of serial sections (SimpleITK samples its metric at random points: a fixed seed, one thread),
training and the selection inside it (ridge_cv's alpha, mlp's epochs, BLEEP's ensemble), and whole-slide
prediction. Sections of different pixel size make the registration resample, where an unseeded sampler
would let the affine stage be kept on one run and refused on the next.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import random_knn_model, tissue_image, write_pyramid
from test_methods import OPTIONS, fitted
from test_stack import MOVES, _moved, _tissue, _truth

from he2st.encoders import create
from he2st.methods import load_method
from he2st.predict.registration import register_sections
from he2st.workflows.predict_slide import predict_slide
from he2st.workflows.stack import load_section, place_sections

pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def two_pixel_sizes(tmp_path_factory) -> list[Path]:
    """The same tissue turned and shifted, the second section scanned at 1/0.7 µm/px instead of 1 µm/px."""
    root = tmp_path_factory.mktemp("sections")
    base = _tissue()
    first = write_pyramid(root / "s0.tif", _moved(base, _truth(*MOVES[0])), 1.0)
    coarse = np.asarray(Image.fromarray(_moved(base, _truth(*MOVES[1]))).resize((1400, 1400)))
    return [first, write_pyramid(root / "s1.tif", coarse, 1.0 / 0.7)]


def test_registration_of_sections_of_different_pixel_size_is_the_same_every_run(two_pixel_sizes):
    fixed, moving = (load_section(p) for p in two_pixel_sizes)
    runs = [register_sections(fixed.view, moving.view) for _ in range(3)]
    for run in runs[1:]:
        assert run.affine_kept == runs[0].affine_kept
        np.testing.assert_array_equal(run.affine.as_array(), runs[0].affine.as_array())
        np.testing.assert_array_equal(run.rigid.as_array(), runs[0].rigid.as_array())
        assert run.dice_after == runs[0].dice_after
    # and the chain a stack is built on
    sections = [load_section(p) for p in two_pixel_sizes]
    chains = [place_sections(sections)[1] for _ in range(2)]
    np.testing.assert_array_equal(chains[0][1].as_array(), chains[1][1].as_array())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_training_and_its_selection_are_the_same_every_run(name):
    (first, test), (second, _) = fitted(name), fitted(name)
    assert first.card is None or first.card.model_dump(exclude={"created"}) == second.card.model_dump(
        exclude={"created"}
    )
    state_a, state_b = first.state(), second.state()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    np.testing.assert_array_equal(
        first.predict(test.without_expression()).expression,
        second.predict(test.without_expression()).expression,
    )


def test_whole_slide_prediction_is_the_same_every_run(tmp_path):
    """A kNN over features of the tiny encoder's width, predicted twice over one slide in small chunks."""
    torch.manual_seed(0)
    encoder = create("test_vit", pretrained=False)
    slide = write_pyramid(tmp_path / "slide.tif", tissue_image(1200, 1200, seed=3), 0.5)
    genes = [f"G{i}" for i in range(6)]
    knn = random_knn_model(encoder, genes)
    model = knn.save(tmp_path / "knn.pt")
    runs = [
        ad.read_h5ad(predict_slide(load_method(model), slide, tmp_path / f"run{i}", encoder=encoder, chunk=8))
        for i in range(2)
    ]
    np.testing.assert_array_equal(runs[0].X, runs[1].X)
    np.testing.assert_array_equal(runs[0].obsm["spatial"], runs[1].obsm["spatial"])
    assert list(runs[0].obs_names) == list(runs[1].obs_names)
