"""Data-parallel training: two gloo processes on CPU take the same steps as one process.

Each rank steps on its share of every batch (uneven shares here: batches of 45 spots split 23 + 22),
contrastive losses gather the whole batch across ranks, and gradients are summed; the per-epoch
training loss and the validation curve must then match one process with the same global batch.
Dropout is off in these runs: each rank draws its own dropout masks, so with dropout the curves agree
in distribution only.

Starting two processes costs each one a fresh interpreter importing torch and he2st (about 5 s on an
idle machine, 20-30 s on a busy one), hence the ``slow`` marks.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from in_process import run_cli
from synthetic import embedded_sections, linear_spots

from he2st.io import MARKER
from he2st.methods import create_method, distributed, load_method
from he2st.workflows.config import TrainRunConfig

TRAIN = {"epochs": 5, "batch_size": 45, "patience": 5}
CASES = {
    "mlp": {"dropout": 0.0, "epochs_by": "validation", "pca_components": None, "n_models": 2,
            "train": TRAIN | {"lr": 1e-3}},
    "bleep_faithful": {"dropout": 0.0, "train": TRAIN},
    # the improved variant: a bank of every spot as negatives, learned temperature, two seeded heads
    "bleep": {"dropout": 0.0, "ensemble": 2, "train": TRAIN},
}
RTOL = 1e-4


def curves(cases: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """Each method's training and validation curves (160 training spots, 40 validation spots)."""
    data = linear_spots(n=200, n_samples=2)
    train, val = data.subset(np.arange(160)), data.subset(np.arange(160, 200))
    return {name: create_method(name, **options).fit(train, val).curves for name, options in cases.items()}


@pytest.mark.slow
def test_two_processes_take_the_one_process_steps(one_torch_thread):
    one = curves(CASES)
    two = distributed.launch(curves, 2, CASES)
    for name in CASES:
        assert len(two[name]["train_loss"]) == TRAIN["epochs"]
        np.testing.assert_allclose(two[name]["train_loss"], one[name]["train_loss"], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(two[name]["val_pearson"], one[name]["val_pearson"], rtol=RTOL, atol=1e-5,
                                   err_msg=name)
    assert one["bleep"]["train_loss"][-1] < one["bleep"]["train_loss"][0]  # it trains


CARHE = {"dropout": 0.0, "histology_transfer": False, "projection_dim": 16, "mlp_hidden": [16], "top_k": 5,
         "train": {"epochs": 3, "batch_size": 45, "patience": 3}}


def carhe_curves(options: dict) -> dict[str, list[float]]:
    """CarHE's curves on spots of which only every 15th has usable cell-type proportions, so some batch shares
    hold none: every process must still take the same all-gathers, and the proportion head's loss stays the
    mean over the whole batch's usable rows."""
    data = linear_spots(n=200, n_samples=2)
    props = np.random.default_rng(0).dirichlet(np.ones(4), 200).astype(np.float32)
    props[np.arange(200) % 15 != 0] = np.nan
    data = replace(data, extras={"celltype_major": props})
    train, val = data.subset(np.arange(160)), data.subset(np.arange(160, 200))
    return create_method("carhe", **options).fit(train, val).curves


@pytest.mark.slow
def test_carhe_with_few_usable_proportions_takes_the_one_process_steps(one_torch_thread):
    one, two = carhe_curves(CARHE), distributed.launch(carhe_curves, 2, CARHE)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=RTOL)
    np.testing.assert_allclose(two["val_pearson"], one["val_pearson"], rtol=RTOL, atol=1e-5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A work folder of three prepared and embedded synthetic ST sections (25 spots each, 3 patients)."""
    return embedded_sections(tmp_path_factory.mktemp("small"), {"S1": "P0", "S2": "P1", "S3": "P2"},
                             [f"G{g}" for g in range(40)])


def train_args(work, embed, out, *extra: str) -> list[str]:
    return ["train", "-w", str(work), "--method", "bleep_faithful", "--samples", "S1,S2,S3", "--out", str(out),
            "--set", "embed.encoder=test_vit", "--set", f"embed.weights={embed.weights}",
            "--set", "embed.num_workers=0", "--set", "genes.n_genes=30", "--set", "genes.min_spot_fraction=0",
            "--set", "n_top=5", "--set", "method_options.bleep_faithful.dropout=0", "--set",
            "method_options.bleep_faithful.top_k=5", *extra]


@pytest.mark.slow
def test_cli_train_on_two_devices_saves_the_one_device_model(small, tmp_path, one_torch_thread):
    work, embed = small
    train = ["--set", "method_options.bleep_faithful.train={epochs: 4, batch_size: 16, patience: 4}"]
    one = run_cli(*train_args(work, embed, tmp_path / "one.pt", *train))
    assert one.returncode == 0, one.stderr
    two = run_cli(*train_args(work, embed, tmp_path / "two.pt", *train, "--devices", "2"))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("trained bleep_faithful on S1, S2, S3") == 1  # one result line, from the caller
    a, b = load_method(tmp_path / "one.pt").card, load_method(tmp_path / "two.pt").card
    assert len(b.curves["train_loss"]) == 4 and b.best_epoch == a.best_epoch
    np.testing.assert_allclose(b.curves["train_loss"], a.curves["train_loss"], rtol=RTOL)
    # one checkpoint (and its reference bank) per run, nothing else
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != MARKER)
    assert written == ["one.bank.h5", "one.pt", "two.bank.h5", "two.pt"]


@pytest.mark.slow
def test_a_rank_error_reaches_the_caller_as_one_line(small, tmp_path):
    work, embed = small
    res = run_cli(*train_args(work, embed, tmp_path / "m.pt", "--set",
                              "method_options.bleep_faithful.train.batch_size=3", "--devices", "2"))
    assert res.returncode == 2 and "error: batch size 3 is too small for 2 devices" in res.stderr, res.stderr
    assert not (tmp_path / "m.pt").exists()


def test_devices_is_a_positive_count():
    assert TrainRunConfig(devices=4).devices == 4
    res = run_cli("train", "--devices", "0")
    assert res.returncode == 2 and "devices" in res.stderr


def test_one_process_is_untouched():
    assert distributed.world_size() == 1 and distributed.is_main()
    idx = torch.arange(10)
    with distributed.sharded():
        assert distributed.shard(idx) is idx and distributed.gather(idx) is idx
