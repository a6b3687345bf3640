"""What a person at a terminal sees: progress with totals, one line per training epoch; nothing in logs."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from he2st import progress
from he2st.methods.training import TrainConfig, fit_minibatches


def _terminal(monkeypatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=True, width=120))
    monkeypatch.setattr(progress, "interactive", lambda: True)
    return out


def test_training_prints_one_line_per_epoch_on_a_terminal(monkeypatch):
    out = _terminal(monkeypatch)
    module = torch.nn.Linear(3, 1)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    fit_minibatches(module, 32, lambda idx: ((module(x[idx]) - y[idx]) ** 2).mean(),
                    TrainConfig(epochs=3, batch_size=8, patience=5), seed=0, validate=lambda: 0.5)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: training loss") and "validation r 0.500" in lines[0]


def test_nothing_is_printed_off_a_terminal(capsys):
    progress.say("epoch 1/3: training loss 1.0")  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_progress_total_can_be_set_once_known(monkeypatch):
    out = _terminal(monkeypatch)
    with progress.progress_bar(None, "predict") as advance:
        advance(0, total=40)
        advance(40)
    assert "40/40" in out.getvalue()
