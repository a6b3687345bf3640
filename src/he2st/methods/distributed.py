"""Data-parallel training over several processes (``he2st train --devices N`` or ``torchrun``).

Every rank holds the whole model and the whole (small) training set, draws the same seeded shuffle and
takes its own contiguous share of each mini-batch (:func:`shard`). Contrastive losses see the whole
batch: inside :func:`sharded`, :func:`gather` concatenates every rank's rows with an autograd-aware
all-gather, so the logits are the one-process logits. Each rank back-propagates its loss weighted by
its share of the batch, and :func:`reduce_gradients` sums the gradients, so that:

* a loss formed on the gathered batch (identical on every rank) gets exactly its one-process gradient
  (the all-gather's backward sums every rank's gradient for a rank's own rows);
* a loss averaged over a rank's own rows gets the gradient of the mean over the whole batch.

Any mix of the two is therefore the one-process step, up to float summation order. Ranks then apply
the same update and stay identical; validation and bank refreshes run on every rank, rank 0's
validation score decides (:func:`agree`), and only rank 0 logs and saves (:func:`is_main`).

Backends: gloo on CPU; on CUDA one process per GPU, NCCL for CUDA tensors and gloo for CPU ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from he2st.errors import He2stError

_sharded = False  # inside a training step whose batch is split across ranks


def world_size() -> int:
    """Number of training processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; before or after a process group, the launcher's ``RANK`` (torchrun) or 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process logs and writes files (rank 0)."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher such as ``torchrun`` started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a mini-batch's indices (shares differ by at most one row)."""
    world = world_size()
    return idx if world == 1 else idx.tensor_split(world)[rank()]


@contextlib.contextmanager
def sharded() -> Iterator[None]:
    """Mark a training step whose batch is this rank's :func:`shard`: :func:`gather` is active inside."""
    global _sharded
    previous, _sharded = _sharded, world_size() > 1
    try:
        yield
    finally:
        _sharded = previous


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order (= the whole batch in its one-process order) inside a
    :func:`sharded` step; ``x`` itself otherwise. Gradients flow back to each rank's own rows."""
    if not _sharded:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    return _GatherRows.apply(x, tuple(int(s) for s in sizes))


class _GatherRows(torch.autograd.Function):
    """All-gather of rows (shares may differ by a few rows) whose backward sums every rank's gradient
    for the whole batch and keeps this rank's rows: each rank's loss reaches the rows it did not hold."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
        ctx.rows = rows
        padded = x.contiguous()
        if x.shape[0] < max(rows):  # all-gather needs equal shapes
            padded = torch.cat([padded, x.new_zeros((max(rows) - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.rows[: rank()])
        return grad[start : start + ctx.rows[rank()]], None


def reduce_gradients(params: Sequence[nn.Parameter], weighted_loss: torch.Tensor) -> float:
    """Sum the gradients of ``params`` over ranks (one all-reduce) and return the summed weighted loss
    (= the whole batch's loss). A parameter no rank touched keeps no gradient, as in one process."""
    if world_size() == 1:
        return float(weighted_loss.detach())
    device = weighted_loss.device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    touched = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([g.reshape(-1).to(device) for g in grads] + [touched, weighted_loss.detach().reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p, used in zip(params, flat[-1 - len(params) : -1].tolist(), strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device).clone() if used > 0 else None
        offset += n
    return float(flat[-1])


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a guard: seeded builds already agree)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def agree(value: float) -> float:
    """Rank 0's ``value`` on every rank, so early-stopping decisions cannot drift apart."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t)


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has saved a file the others read); one process: nothing."""
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writing an embedding cache); the others then run it and find
    its output, instead of racing to write the same files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def setup(rank_: int, world: int, init_method: str = "env://") -> None:
    """Join a process group: gloo on CPU; with CUDA, GPU ``LOCAL_RANK`` (else ``rank_``) and NCCL for
    CUDA tensors, gloo for CPU ones."""
    backend = "gloo"
    if torch.cuda.is_available():
        if torch.cuda.device_count() < world and "LOCAL_RANK" not in os.environ:
            raise He2stError(f"--devices {world} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank_)))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world)


def teardown() -> None:
    """Leave the process group, so a later group in the same process (the next test, a second run) can form."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], devices: int, *args: Any) -> Any:
    """``fn(*args)`` data-parallel, returning rank 0's result (small and picklable, e.g. a path).

    Under ``torchrun`` this process is already one rank: it joins the group (``devices`` is then the
    launcher's ``--nproc-per-node``, not this argument). Otherwise ``devices`` > 1 starts that many
    processes (one per GPU with CUDA) and 1 runs ``fn`` here.
    """
    if launched():
        setup(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        try:
            result = fn(*args)
            barrier()  # every rank through its last collective before any leaves the group (below)
            return result
        finally:
            teardown()
    if devices <= 1:
        return fn(*args)
    queue = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_worker, args=(devices, _free_port(), fn, args, queue), nprocs=devices, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        errors = [value for kind, value in _drain(queue) if kind == "error"]
        if errors:  # bad input: the one line the CLI prints; anything else keeps its traceback
            raise He2stError(errors[0]) from None
        raise
    return next(value for kind, value in _drain(queue) if kind == "result")


def _worker(rank_: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    setup(rank_, world, f"tcp://127.0.0.1:{port}")
    try:
        result = fn(*args)
        # a rank that leaves the group while another still exchanges with it can abort that one's gloo threads
        # ("terminate called without an active exception"): all meet here first. (A rank that raised does not:
        # its peers then fail on the lost connection and the error is reported.)
        barrier()
        if rank_ == 0:
            queue.put(("result", result))
    except He2stError as exc:
        queue.put(("error", str(exc)))
        raise
    finally:
        teardown()


def _drain(queue: Any) -> list[tuple[str, Any]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
