"""One mini-batch training loop for every neural method: AdamW, seeded shuffling, early stopping.

Early stopping and checkpoint choice use a validation score computed on spots of *training*
patients only (the caller passes them); the best weights are restored at the end.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from he2st.errors import He2stError
from he2st.methods.base import TrainLog


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    patience: int = Field(10, gt=0, description="epochs without validation improvement before stopping")
    grad_clip: float | None = 5.0


def seed_everything(seed: int) -> torch.Generator:
    """Deterministic CPU runs: seeds torch and numpy, returns a generator for shuffling."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def fit_minibatches(
    module: nn.Module,
    n_items: int,
    step: Callable[[torch.Tensor], torch.Tensor],
    config: TrainConfig,
    seed: int,
    validate: Callable[[], float] | None = None,
    before_epoch: Callable[[], None] | None = None,
) -> TrainLog:
    """Train ``module`` by calling ``step(batch_indices) -> loss`` over shuffled mini-batches.

    ``validate()`` scores the model's own predictions on validation spots (higher is better: the
    mean per-gene Pearson); the best epoch's weights are kept, and training stops after
    ``patience`` epochs without improvement. Without it the last epoch is kept. ``before_epoch()``
    runs before each epoch (e.g. refreshing a bank of detached negatives). Batches smaller than half
    the batch size are dropped when possible, because contrastive losses degenerate on tiny batches.
    """
    if n_items == 0:
        raise He2stError("no training spots left (is the validation fraction too large?)")
    gen = seed_everything(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    log = TrainLog()
    best, best_state, stale = -float("inf"), None, 0
    start = time.perf_counter()
    batch = min(config.batch_size, n_items)
    for epoch in range(config.epochs):
        if before_epoch is not None:
            before_epoch()
        module.train()
        order = torch.randperm(n_items, generator=gen)
        losses = []
        for a in range(0, n_items, batch):
            idx = order[a : a + batch]
            if len(idx) < max(2, batch // 2) and a > 0:
                continue
            loss = step(idx)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimiser.step()
            losses.append(float(loss.detach()))
        log.add(train_loss=float(np.mean(losses)))
        if validate is None:
            continue
        module.eval()
        with torch.no_grad():
            score = float(validate())
        log.add(val_pearson=score)
        if score > best + 1e-6:
            best, best_state, stale = score, copy.deepcopy(module.state_dict()), 0
            log.best_epoch = epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        log.best_epoch = len(log.curves.get("train_loss", [])) - 1
    module.eval()
    log.seconds = time.perf_counter() - start
    return log
