"""``benchmarks/train_scaling.py``: the line format the scaling figures are quoted from, and what an
epoch is (each epoch's own training pass, recorded by the training loop)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from he2st.methods import create_method


@pytest.mark.slow  # runs the benchmark script's fits
def test_prints_one_line_per_method_and_size() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_scaling.py"), "--n", "120,240", "--methods", "mlp,knn",
         "--epochs", "2"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("method=")]
    pattern = re.compile(r"^method=(\w+) n=(\d+) seconds_per_epoch=(\d+\.\d+)$")
    assert [pattern.match(line).groups()[:2] for line in lines] == [
        ("mlp", "120"), ("mlp", "240"), ("knn", "120"), ("knn", "240")]


def test_training_loop_records_each_epochs_seconds() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_scaling import synthetic

    spots = synthetic(200)
    log = create_method("nh2st", dim=32, fusion_heads=4, head_hidden=32, train={"epochs": 3}).fit(spots)
    assert len(log.epoch_seconds) == len(log.curves["train_loss"]) == 3
    assert all(s > 0 for s in log.epoch_seconds) and sum(log.epoch_seconds) <= log.seconds


def test_the_fused_optimiser_trains_as_the_per_tensor_one() -> None:
    """``benchmarks/optimiser_step.py``: the training loop's fused AdamW makes torch's per-tensor update."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from optimiser_step import FUSED, PER_TENSOR, epoch_seconds
    from train_scaling import synthetic

    spots = synthetic(300)
    losses = [epoch_seconds("mlp", spots, 3, kind)[1] for kind in (PER_TENSOR, FUSED)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
