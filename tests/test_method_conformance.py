"""What every registered method promises, checked for each of them (as timm tests every registered model).

A tiny configuration per method (one or two epochs, small layers) on three synthetic samples: two to train
on, one held out. Each method must predict spots x panel genes, give the same predictions after a checkpoint
round trip and after a second fit with the same seed, and never read the held-out spots' expression. A new
method needs a row in ``TINY``; the first test says so when it is missing.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from synthetic import linear_spots

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.methods import Method, create_method, list_methods, load_method

TRAIN = {"epochs": 2, "batch_size": 16, "patience": 2}
TINY: dict[str, dict] = {
    "bleep": {"ensemble": 1, "train": TRAIN},
    "bleep_faithful": {"top_k": 5, "train": TRAIN},
    "carhe": {"projection_dim": 16, "mlp_hidden": [16], "celltype_transfer": False, "histology_pretrain_epochs": 1,
              "histology_neighbours": 4, "top_k": 5, "train": TRAIN},
    "cmrcnet": {"projection_dim": 16, "mlp_hidden": [16], "attention_dim": 16, "expression_token_hidden": 16,
                "cross_heads": 2, "fusion_heads": 2, "fusion_depth": 1, "top_k": 5, "train": TRAIN},
    "cmrcnet_faithful": {"projection_dim": 16, "attention_dim": 16, "cross_heads": 2, "fusion_heads": 2,
                         "fusion_depth": 1, "top_k": 5, "train": TRAIN},
    "ensemble": {"members": {"knn": {"method": "knn", "top_k": 5}, "ridge": {"method": "ridge", "pca_components": 8},
                             "bleep": {"method": "bleep", "ensemble": 1, "train": TRAIN}}},
    "knn": {"top_k": 5},
    "mlp": {"train": TRAIN},
    "nh2st": {"dim": 16, "fusion_heads": 2, "head_hidden": 16, "neighbour_k": 4, "train": TRAIN},
    "nh2st_faithful": {"dim": 16, "fusion_heads": 2, "head_hidden": 16, "neighbour_k": 4, "train": TRAIN},
    "ridge": {"pca_components": 8},
    "ridge_cv": {"pca_components": 8},
}
SEED = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def split() -> tuple[SpotSet, SpotSet]:
    """Samples s1 and s2 (patients P1, P2) to train on, s3 held out; 50 spots each."""
    spots = linear_spots(n=150, n_samples=3)
    held_out = spots.sample_ids == "s3"
    return spots.subset(np.flatnonzero(~held_out)), spots.subset(np.flatnonzero(held_out))


def fit(name: str) -> Method:
    train, _ = split()
    method = create_method(name, seed=SEED, **TINY[name])
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    method.fit(train)
    return method


@functools.cache
def fitted(name: str) -> tuple[Method, np.ndarray]:
    """One fit per method for the whole module, with its predictions for the held-out sample."""
    method = fit(name)
    return method, method.predict(split()[1]).expression


def test_every_method_has_a_tiny_configuration():
    assert sorted(TINY) == list_methods(), "give each registered method a tiny configuration in TINY"


@pytest.mark.parametrize("name", list_methods())
def test_predicts_every_held_out_spot_for_every_panel_gene(name):
    method, _ = fitted(name)
    _, test = split()
    pred = method.predict(test)
    assert pred.expression.shape == (len(test), len(method.panel.genes)) and pred.genes == method.panel.genes
    assert np.isfinite(pred.expression).all()
    for values in (*pred.uncertainty.values(), *pred.extras.values()):
        assert len(values) == len(test)


@pytest.mark.parametrize("name", list_methods())
def test_checkpoint_round_trip_predicts_identically(name, tmp_path):
    method, expression = fitted(name)
    _, test = split()
    path = method.save(tmp_path / f"{name}.pt")
    assert method.bank_path(path).exists() == method.uses_bank
    back = load_method(path)
    assert type(back) is type(method) and back.config == method.config and back.panel == method.panel
    again = back.predict(test)
    np.testing.assert_array_equal(again.expression, expression)
    assert again.extras.keys() == method.predict(test).extras.keys()


@pytest.mark.parametrize("name", list_methods())
def test_same_seed_same_predictions(name):
    _, expression = fitted(name)
    np.testing.assert_array_equal(fit(name).predict(split()[1]).expression, expression)


@pytest.mark.parametrize("name", list_methods())
def test_prediction_never_reads_the_held_out_expression(name):
    """Held-out spots with NaN expression, or with none at all, predict exactly as with the truth -- also
    when the method's own ``_predict`` is handed the NaN targets directly."""
    method, expression = fitted(name)
    _, test = split()
    nan = replace(test, targets=np.full_like(test.targets, np.nan))
    np.testing.assert_array_equal(method.predict(test.without_expression()).expression, expression)
    np.testing.assert_array_equal(method.predict(nan).expression, expression)
    np.testing.assert_array_equal(method._predict(method.contextual(nan)).expression, expression)


@pytest.mark.parametrize("name", [name for name, tiny in TINY.items() if "train" in tiny])
def test_bf16_training_runs_products_in_bf16_and_keeps_fp32_weights(name):
    """``train.precision="bf16"``: every neural method's training products run in bfloat16 (a hook on its
    linear layers sees them), its weights stay fp32, and it predicts as the fp32 fit does, to bf16's
    precision."""
    import torch

    train, test = split()
    method = create_method(name, seed=SEED, **(TINY[name] | {"train": TRAIN | {"precision": "bf16"}}))
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    seen: set[torch.dtype] = set()
    original = torch.nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        if self.training:
            seen.add(out.dtype)
        return out

    torch.nn.Linear.forward = spy
    try:
        method.fit(train)
    finally:
        torch.nn.Linear.forward = original
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for module in method.modules().values() for p in module.parameters())
    expression = method.predict(test).expression
    _, fp32 = fitted(name)
    assert np.isfinite(expression).all()
    assert np.corrcoef(expression.ravel(), fp32.ravel())[0, 1] > 0.9
