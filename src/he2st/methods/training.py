"""One mini-batch training loop for every neural method: AdamW, an optional learning-rate schedule,
seeded shuffling, early stopping.

Early stopping and checkpoint choice use a validation score computed on spots of *training*
patients only (the caller passes them); the best weights are restored at the end. Under several
processes (:mod:`he2st.methods.distributed`) each rank steps on its share of every batch and the
summed gradients make the one-process step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from he2st.errors import He2stError
from he2st.methods import distributed
from he2st.methods.base import TrainLog
from he2st.methods.configs.common import TrainConfig
from he2st.progress import say

#: AdamW's implementation: one fused kernel per step for all parameters, the same update as torch's
#: per-tensor CPU default at less cost (``benchmarks/optimiser_step.py`` compares them)
ADAMW_OPTIONS: dict[str, bool] = {"fused": True}
#: a validation score within this of another is the same score (float noise), for the best epoch and the patience
SAME_SCORE = 1e-6


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under ``config.schedule``.

    'cosine' is CMRCNet's ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` stepped *before* each
    epoch, so epoch ``e`` runs at step ``e + 1``: already below ``lr`` in the first epoch, ``min_lr`` in
    the last. 'step' is ``StepLR`` stepped after each epoch, as Lightning does for NH2ST.
    """
    if config.schedule == "cosine":
        progress = (epoch + 1) / config.epochs
        return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress)) / 2
    if config.schedule == "step":
        return config.lr * config.gamma ** (epoch // config.step_epochs)
    return config.lr


def step_autocast(config: TrainConfig, params: list[torch.Tensor]) -> AbstractContextManager:
    """The arithmetic of each training step on the parameters' device: under ``precision="bf16"`` matrix
    products run in bfloat16 (about 1.4x the fp32 step on a CPU with bf16 instructions) while weights,
    optimiser state and the reductions autocast keeps in fp32 stay fp32 -- mixed precision, as on a GPU.
    Under fp32 nothing is entered, so an autocast the caller holds is left as it is."""
    if config.precision != "bf16":
        return nullcontext()
    return torch.autocast(params[0].device.type if params else "cpu", dtype=torch.bfloat16)


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
    ``patience`` epochs without a gain of ``min_delta`` over the score that last restarted it. A
    smaller gain is kept but does not prolong training: on a large training set the curve can creep up
    by less than that for dozens of epochs, and each such step would otherwise buy ``patience`` more
    epochs. Without it the last epoch is kept. ``before_epoch()``
    runs before each epoch (e.g. refreshing a bank of detached negatives). Batches smaller than half
    the batch size are dropped when possible, because contrastive losses degenerate on tiny batches.
    """
    if n_items == 0:
        raise He2stError("no training spots left (is the validation fraction too large?)")
    gen = seed_everything(seed)
    world = distributed.world_size()
    if world > 1:
        distributed.broadcast_module(module)
        torch.manual_seed(seed + distributed.rank())  # own dropout masks per rank; the shuffle (gen) is shared
        if min(config.batch_size, n_items) < 2 * world:
            raise He2stError(f"batch size {min(config.batch_size, n_items)} is too small for {world} devices "
                             f"(at least two spots per device)")
    params = [p for p in module.parameters() if p.requires_grad]
    autocast = step_autocast(config, params)
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **ADAMW_OPTIONS)
    log = TrainLog()
    best, best_state, stale = -float("inf"), None, 0
    mark = -float("inf")  # the score that last restarted the patience
    start = time.perf_counter()
    batch = min(config.batch_size, n_items)
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, epoch)
        if before_epoch is not None:
            before_epoch()
        module.train()
        order = torch.randperm(n_items, generator=gen)
        losses = []
        for a in range(0, n_items, batch):
            idx = order[a : a + batch]
            if len(idx) < max(2, batch // 2) and a > 0:
                continue
            optimiser.zero_grad(set_to_none=True)
            if world == 1:
                with autocast:
                    loss = step(idx)
                loss.backward()
                value = float(loss.detach())
            else:
                part = distributed.shard(idx)
                with distributed.sharded(), autocast:
                    loss = step(part) * (len(part) / len(idx))
                loss.backward()
                value = distributed.reduce_gradients(params, loss)
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimiser.step()
            losses.append(value)
        log.add(train_loss=float(np.mean(losses)))
        log.epoch_seconds.append(time.perf_counter() - epoch_start)
        if validate is None:
            if distributed.is_main():
                say(f"epoch {epoch + 1}/{config.epochs}: training loss {np.mean(losses):.4f}")
            continue
        module.eval()
        with torch.no_grad():
            score = distributed.agree(float(validate()))
        log.add(val_pearson=score)
        if distributed.is_main():
            say(f"epoch {epoch + 1}/{config.epochs}: training loss {np.mean(losses):.4f}, validation r {score:.3f}")
        if score > best + SAME_SCORE:
            best, best_state = score, copy.deepcopy(module.state_dict())
            log.best_epoch = epoch
        if score > mark + max(config.min_delta, SAME_SCORE):
            mark, stale = score, 0
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
