"""SimSiam (Chen & He, CVPR 2021) on H&E patches: the training loop behind ``he2st adapt``.

Two augmented views of a patch -- stain jitter, crop, dihedral turn and colour jitter -- or, with
``neighbours``, of a patch and an adjacent spot's patch, are pulled together through a projector and a
predictor with a stop-gradient on the target. It needs neither negatives nor large batches nor a second
network, so one step costs two forward passes and the backward pass of the trained blocks: it suits a CPU.
The layers before the trained blocks keep their pretrained values and every BatchNorm keeps its running
statistics (the backbone stays in eval mode), so the features start from the pretrained ones; the projector
and predictor are discarded afterwards. The loop runs on any source of uint8 patches (:class:`PatchSource`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from he2st.encoders.adaptation import AdaptConfig
from he2st.encoders.augment import augment_batch, hed_jitter, random_crop
from he2st.encoders.encoder import Encoder
from he2st.errors import He2stError

HEAD_LR_FACTOR = 10.0  # the projector and predictor start from random values: they learn faster
_PROJECTION_DIM = 256
_PREDICTOR_HIDDEN = 64


class PatchSource(Protocol):
    """The patches an encoder is adapted on, numbered ``0 .. n - 1`` across samples."""

    n: int
    neighbours: Sequence[np.ndarray]  # per patch: the numbers of the patches of its adjacent spots

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 patches ``(len(index), H, W, 3)`` in the order of ``index``."""
        ...


@dataclass
class AdaptResult:
    """The adapted encoder (frozen, eval mode) and how its training went."""

    encoder: Encoder
    epoch_loss: list[float]  # mean loss of each epoch (-1 is perfect agreement of the views)
    patches_per_epoch: int
    trained_parameters: int
    seconds: float


def adapt_encoder(
    encoder: Encoder, source: PatchSource, config: AdaptConfig, on_step: Callable[[int], None] | None = None
) -> AdaptResult:
    """Adapt ``encoder`` in place on ``source`` by SimSiam (see the module docstring); returns it frozen."""
    if source.n < 2:
        raise He2stError(f"adaptation needs at least 2 patches, got {source.n}")
    device = _device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = _Heads(encoder.embed_dim)
    trained = select_trainable(encoder, config.train_blocks)
    encoder.to(device).eval()  # BatchNorm statistics and dropout stay as pretrained
    heads.to(device).train()
    optimizer = torch.optim.Adam([{"params": trained, "lr": config.lr},
                                  {"params": list(heads.parameters()), "lr": config.lr * HEAD_LR_FACTOR}])
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = min(source.n, config.max_patches or source.n)
    batch = min(config.batch_size, per_epoch)
    start = time.perf_counter()
    epoch_loss = []
    for _ in range(config.epochs):
        order = rng.permutation(source.n)[:per_epoch]
        losses = []
        for first in range(0, per_epoch - batch + 1, batch):  # full batches only: BatchNorm in the heads
            index = order[first : first + batch]
            loss = _step(encoder, heads, source, index, _partners(index, source.neighbours, config.neighbours, rng),
                         generator, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(1)
        epoch_loss.append(float(np.mean(losses)))
    encoder.set_trainable(False).eval().cpu()
    return AdaptResult(encoder, epoch_loss, per_epoch, sum(p.numel() for p in trained),
                       time.perf_counter() - start)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise He2stError(f"adapt.device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise He2stError(f"adapt.device {name!r}: no CUDA GPU is available here; use cpu")
    return device


def steps(n: int, config: AdaptConfig) -> int:
    """Optimiser steps :func:`adapt_encoder` takes on ``n`` patches (a progress bar's total)."""
    per_epoch = min(n, config.max_patches or n)
    return config.epochs * (per_epoch // min(config.batch_size, per_epoch))


def select_trainable(encoder: Encoder, train_blocks: int | None) -> list[nn.Parameter]:
    """Turn gradients on for the last ``train_blocks`` blocks of the backbone and the layers after them
    (all of it when None); returns the parameters that train."""
    encoder.set_trainable(train_blocks is None)
    if train_blocks is not None:
        backbone = encoder.backbone
        blocks = _flat_blocks(backbone, encoder.spec.name)
        if train_blocks > len(blocks):
            raise He2stError(f"train_blocks={train_blocks}, but encoder '{encoder.spec.name}' has {len(blocks)} blocks")
        children = [name for name, _ in backbone.named_children()]
        after = [getattr(backbone, name) for name in children[children.index("blocks") + 1 :]]
        for module in [*blocks[-train_blocks:], *after]:
            module.requires_grad_(True)
    return [p for p in encoder.backbone.parameters() if p.requires_grad]


def _flat_blocks(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The backbone's blocks in order (EfficientNet's stages flattened; a ViT's blocks as they are)."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise He2stError(f"encoder '{name}' has no sequence of blocks to train the last of; set train_blocks=null "
                         "to train all of it")
    return [block for stage in blocks for block in (stage if isinstance(stage, nn.Sequential) else [stage])]


def _partners(index: np.ndarray, neighbours: Sequence[np.ndarray], chance: float,
              rng: np.random.Generator) -> np.ndarray:
    """The patch of each second view: with probability ``chance`` one of the patch's adjacent spots."""
    partners = index.copy()
    draws = rng.random(len(index))
    for k, i in enumerate(index):
        adjacent = neighbours[i]
        if len(adjacent) and draws[k] < chance:
            partners[k] = adjacent[rng.integers(len(adjacent))]
    return partners


def views(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per patch: stain jitter, crop, dihedral turn and brightness/contrast/saturation jitter
    (uint8 in and out; no hue jitter: the stain jitter varies the colour at an eighth of its cost)."""
    return augment_batch(random_crop(hed_jitter(patches, generator), generator), generator, jitter=0.2, hue=0.0)


def _step(encoder: Encoder, heads: _Heads, source: PatchSource, index: np.ndarray, partners: np.ndarray,
          generator: torch.Generator, device: torch.device) -> torch.Tensor:
    wanted = np.unique(np.concatenate([index, partners]))
    patches = torch.from_numpy(source.read(wanted))
    first = views(patches[np.searchsorted(wanted, index)], generator)
    second = views(patches[np.searchsorted(wanted, partners)], generator)
    z1, z2 = (heads.projector(encoder(encoder.preprocess(v).to(device))) for v in (first, second))
    p1, p2 = heads.predictor(z1), heads.predictor(z2)
    return simsiam_loss(p1, p2, z1, z2)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine of each view's prediction with the other view's projection, the projection
    detached (the stop-gradient that keeps SimSiam from collapsing to a constant): -1 is perfect agreement."""
    first, second = F.cosine_similarity(p1, z2.detach(), dim=-1), F.cosine_similarity(p2, z1.detach(), dim=-1)
    return -(first.mean() + second.mean()) / 2


class _Heads(nn.Module):
    """SimSiam's projector (embedding -> 256) and bottleneck predictor (256 -> 64 -> 256), both discarded."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(dim, 2 * _PROJECTION_DIM, bias=False), nn.BatchNorm1d(2 * _PROJECTION_DIM), nn.ReLU(),
            nn.Linear(2 * _PROJECTION_DIM, _PROJECTION_DIM, bias=False), nn.BatchNorm1d(_PROJECTION_DIM))
        self.predictor = nn.Sequential(
            nn.Linear(_PROJECTION_DIM, _PREDICTOR_HIDDEN, bias=False), nn.BatchNorm1d(_PREDICTOR_HIDDEN), nn.ReLU(),
            nn.Linear(_PREDICTOR_HIDDEN, _PROJECTION_DIM))
