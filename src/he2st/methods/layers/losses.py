"""Contrastive losses: faithful BLEEP, an improved CLIP-style loss, NH2ST's InfoNCE, he2st's alignment
module that switches between them, and a multi-positive InfoNCE for image↔image learning.

Conventions: ``img`` and ``spot`` are ``(B, D)`` embeddings of the same B spots (row i of
each describes spot i); every loss returns a scalar averaged over the batch and, unless an
option says otherwise, both directions (image→expression and expression→image).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from he2st.errors import He2stError
from he2st.methods.distributed import gather

__all__ = [
    "AlignmentLoss",
    "ContrastiveLoss",
    "EmbeddingQueue",
    "NegativeBank",
    "bleep_soft_clip_loss",
    "info_nce",
    "multi_positive_nce",
    "reference_contrastive_loss",
    "unit_reference_loss",
    "unit_similarity_targets",
]


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a target distribution: ``-Σ_j targets_ij log softmax(logits)_ij``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def _soft_targets(img: torch.Tensor, spot: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """BLEEP's soft targets: softmax over the mean of the within-modality similarity matrices.

    Two spots that look alike *and* express alike share probability mass, so near-duplicate
    neighbours in a batch are not pushed apart as hard negatives.
    """
    similarity = (img @ img.T + spot @ spot.T) / 2
    return F.softmax(similarity / temperature, dim=-1)


def bleep_soft_clip_loss(
    img_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0, per_spot: bool = False
) -> torch.Tensor:
    """BLEEP's loss (with the published fix to the target temperature), reproduced faithfully.

    ``logits = spot @ img.T / τ``; ``targets = softmax(((img @ img.T + spot @ spot.T) / 2) / τ)``;
    the loss is the mean over rows of the two directions' soft cross-entropies. ``per_spot=True``
    returns the ``(B,)`` row losses before that mean (CMRCNet takes ``log(1 + ·)`` of each first).
    CMRCNet's copy still divides the targets' similarities by ``2 * τ`` the pre-fix way
    (``/ 2 * τ``); at its τ = 1 both forms agree.

    Embeddings are deliberately *not* L2-normalised, as in BLEEP. That makes the loss depend
    on embedding norms and on the batch: the targets are a softmax over the other spots in
    the same batch, so both the loss value and how sharply a spot is separated from its
    neighbours change with batch size and composition. Compare runs only at equal batch size;
    :class:`ContrastiveLoss` is the normalised variant without that coupling to norms.
    """
    img_emb, spot_emb = gather(img_emb), gather(spot_emb)  # the whole batch under several processes
    logits = spot_emb @ img_emb.T / temperature
    targets = _soft_targets(img_emb, spot_emb, temperature)
    spots_loss = _soft_cross_entropy(logits, targets)
    images_loss = _soft_cross_entropy(logits.T, targets.T)
    loss = (images_loss + spots_loss) / 2
    return loss if per_spot else loss.mean()


class ContrastiveLoss(nn.Module):
    """Improved-BLEEP loss: cosine logits, learnable temperature, soft or hard targets, optional queue.

    * Both embeddings are L2-normalised, so logits are cosine similarities over ``τ`` and
      cannot be inflated by growing embedding norms.
    * ``τ`` is learned as ``log τ`` (initialised at ``init_temperature``) and kept in
      ``[min_temperature, max_temperature]``: the parameter is clamped in place before each
      forward pass (as CLIP does), so it never sticks outside the range with a zero gradient.
    * ``soft_targets=True`` uses BLEEP's soft targets computed on the normalised embeddings
      with a *fixed* ``target_temperature`` (so the learned τ cannot flatten its own targets);
      ``False`` uses identity targets, i.e. symmetric InfoNCE.
    * ``queue_img``/``queue_spot`` (``(Q, D)``, normalised, e.g. from :class:`EmbeddingQueue`)
      add Q extra negative columns: image rows score against ``[batch spots, queue_spot]`` and
      spot rows against ``[batch images, queue_img]``, with target 0 on queue columns. More
      negatives than a batch holds sharpen the contrast when batches are small.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        soft_targets: bool = True,
        target_temperature: float = 0.1,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                f"init_temperature={init_temperature} outside [{min_temperature}, {max_temperature}]"
            )
        if target_temperature <= 0:
            raise ValueError(f"target_temperature must be > 0, got {target_temperature}")
        log_t = torch.tensor(math.log(init_temperature))
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_temperature)
        self.soft_targets = soft_targets
        self.target_temperature = target_temperature
        self.log_bounds = (math.log(min_temperature), math.log(max_temperature))

    @property
    def temperature(self) -> float:
        """Current (clamped) temperature."""
        return float(self.log_temperature.detach().clamp(*self.log_bounds).exp())

    def tau(self) -> torch.Tensor:
        """The temperature as a tensor that carries its gradient (clamped into range in place first)."""
        with torch.no_grad():
            self.log_temperature.clamp_(*self.log_bounds)
        return self.log_temperature.exp()

    def forward(
        self,
        img: torch.Tensor,
        spot: torch.Tensor,
        queue_img: torch.Tensor | None = None,
        queue_spot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss for a batch of paired ``(B, D)`` embeddings plus optional queued negatives."""
        tau = self.tau()
        img, spot = gather(img), gather(spot)  # the whole batch under several processes
        img = F.normalize(img, dim=-1)
        spot = F.normalize(spot, dim=-1)
        batch = img.shape[0]
        if self.soft_targets:
            targets = _soft_targets(img, spot, self.target_temperature).detach()
        else:
            targets = torch.eye(batch, dtype=img.dtype, device=img.device)

        spot_columns = spot if queue_spot is None else torch.cat([spot, queue_spot.detach()])
        img_columns = img if queue_img is None else torch.cat([img, queue_img.detach()])
        images_loss = _soft_cross_entropy(img @ spot_columns.T / tau, _pad_columns(targets.T, spot_columns))
        spots_loss = _soft_cross_entropy(spot @ img_columns.T / tau, _pad_columns(targets, img_columns))
        return ((images_loss + spots_loss) / 2).mean()


def _pad_columns(targets: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Extend ``(B, B)`` targets with zero columns for the queued negatives in ``columns``."""
    extra = columns.shape[0] - targets.shape[1]
    return F.pad(targets, (0, extra)) if extra else targets


class EmbeddingQueue(nn.Module):
    """FIFO ring buffer of past embeddings, used as extra negatives (MoCo-style).

    Stores detached, L2-normalised copies; once full, each ``enqueue`` overwrites the oldest
    rows. It is a module with buffers so it follows ``.to(device)`` and is saved in the
    model's ``state_dict`` (a resumed run continues with the same negatives). Use one queue
    per modality.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("buffer", torch.zeros(size, dim))
        self.register_buffer("next_row", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Append ``(n, dim)`` embeddings; if ``n`` exceeds the capacity only the last rows are kept."""
        size = self.buffer.shape[0]
        x = gather(x.detach())  # every process queues the whole batch
        x = F.normalize(x, dim=-1)[-size:].to(self.buffer.dtype)
        rows = (int(self.next_row) + torch.arange(x.shape[0], device=self.buffer.device)) % size
        self.buffer[rows] = x
        self.next_row.fill_((int(self.next_row) + x.shape[0]) % size)
        self.filled.fill_(min(size, int(self.filled) + x.shape[0]))

    def tensor(self) -> torch.Tensor:
        """The filled rows, oldest first, as a ``(len(self), dim)`` tensor (detached)."""
        if int(self.filled) < self.buffer.shape[0]:
            return self.buffer[: int(self.filled)]
        return torch.roll(self.buffer, -int(self.next_row), dims=0)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.05,
    negative_weight: float = 1.0,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE between paired ``(B, D)`` embeddings with NH2ST's scaled negatives.

    Cosine similarities are computed on L2-normalised inputs; as in NH2ST, the off-diagonal
    (negative-pair) similarities are multiplied by ``negative_weight`` (the order relative to the
    division by ``temperature`` does not matter), while the diagonal (positives) is left unchanged.
    A weight below 1 therefore softens the push-away from negatives. ``symmetric=False`` is NH2ST's
    one-directional form: each row of ``a`` picks its partner among the rows of ``b``
    (``F.cross_entropy(logits, arange(B))``); ``True`` averages it with the ``b -> a`` direction.
    ``negative_weight=1`` with ``symmetric=True`` is standard symmetric InfoNCE.
    """
    a, b = gather(a), gather(b)  # the whole batch under several processes
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    batch = a.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=a.device)
    similarity = a @ b.T
    logits = torch.where(eye, similarity, similarity * negative_weight) / temperature
    labels = torch.arange(batch, device=a.device)
    if not symmetric:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def expression_similarity_targets(
    batch_expr: torch.Tensor, all_expr: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Soft targets over a whole reference set from *measured* expression similarity.

    Rows are ``softmax(cos(y_i, y_j) / temperature)`` over all reference spots j (inputs should be
    standardised per gene). Spots whose expression resembles spot i are not treated as negatives,
    which matters when a training set holds many near-identical neighbouring spots: the image
    embedding learns to retrieve spots with similar expression -- what retrieval prediction uses.
    """
    return unit_similarity_targets(F.normalize(batch_expr, dim=-1), F.normalize(all_expr, dim=-1), temperature)


def unit_similarity_targets(batch_unit: torch.Tensor, all_unit: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`expression_similarity_targets` on expression rows that are already L2-normalised."""
    return F.softmax(batch_unit @ all_unit.T / temperature, dim=-1)


def reference_contrastive_loss(
    img: torch.Tensor, spot: torch.Tensor, img_all: torch.Tensor, spot_all: torch.Tensor,
    targets: torch.Tensor, temperature: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric cross-entropy of a batch against every reference spot (cosine logits / τ).

    ``img``/``spot`` ``(B, D)`` are the batch, ``img_all``/``spot_all`` ``(N, D)`` all training spots,
    ``targets`` ``(B, N)`` rows summing to 1 (e.g. :func:`expression_similarity_targets`).
    """
    return unit_reference_loss(F.normalize(img, dim=-1), F.normalize(spot, dim=-1), F.normalize(img_all, dim=-1),
                               F.normalize(spot_all, dim=-1), targets, temperature)


def unit_reference_loss(
    img: torch.Tensor, spot: torch.Tensor, img_all: torch.Tensor, spot_all: torch.Tensor,
    targets: torch.Tensor, temperature: torch.Tensor | float,
) -> torch.Tensor:
    """:func:`reference_contrastive_loss` on embeddings that are already L2-normalised."""
    return _symmetric_soft_loss(img @ spot_all.T / temperature, spot @ img_all.T / temperature, targets)


def _symmetric_soft_loss(image_logits: torch.Tensor, spot_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of both directions' soft cross-entropies against the same ``targets``."""
    return ((_soft_cross_entropy(image_logits, targets) + _soft_cross_entropy(spot_logits, targets)) / 2).mean()


class NegativeBank:
    """Negatives beyond the batch at a cost linear in the number of spots (MoCo's memory bank, refreshed
    every epoch): detached embeddings of every training spot are recomputed once per epoch
    (:meth:`refresh`); each step contrasts the live batch with itself plus ``n_negatives`` spots drawn
    uniformly from the bank (all of them when the bank is small), with soft targets from *measured*
    expression similarity over that set (:func:`expression_similarity_targets`), so near-identical
    neighbouring spots are not pushed apart. Gradients flow through the batch's own embeddings only.

    ``z`` ``(N, G)`` is the training expression standardised per gene (training statistics). Rows are
    kept L2-normalised (``z`` once, the embeddings at each refresh): each step then normalises only its
    live batch, where normalising the drawn negatives again cost a third of a step.
    """

    def __init__(self, z: torch.Tensor, n_negatives: int, target_temperature: float,
                 generator: torch.Generator) -> None:
        self.z, self.n_negatives, self.target_temperature = F.normalize(z, dim=-1), n_negatives, target_temperature
        self.generator = generator
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def refresh(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """The bank's embeddings of every training spot (both modalities), computed without gradients."""
        self.a, self.b = F.normalize(a.detach(), dim=-1), F.normalize(b.detach(), dim=-1)

    def loss(self, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
        """Symmetric soft-target contrastive loss of the batch ``idx`` (live embeddings ``a``, ``b``)."""
        idx, a, b = gather(idx), gather(a), gather(b)  # the whole batch under several processes
        n = len(self.z)
        if n <= self.n_negatives:
            others = torch.arange(n)
        else:
            others = torch.randint(n, (self.n_negatives,), generator=self.generator)
        rows = torch.cat([idx, others])
        targets = unit_similarity_targets(self.z[idx], self.z[rows], self.target_temperature)
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        # unit_reference_loss against [batch, negatives], each side's logits as two products: the detached
        # negatives then take no part in the backward pass, where one product over their concatenation
        # computes their gradient and discards it (a bleep fit 1.06x faster)
        return _symmetric_soft_loss(torch.cat([a @ b.T, a @ self.b[others].T], 1) / temperature,
                                    torch.cat([b @ a.T, b @ self.a[others].T], 1) / temperature, targets)


class AlignmentLoss(nn.Module):
    """Contrastive alignment of two modalities with he2st's options, in one module.

    ``kind="bleep_soft"``: BLEEP's soft-target CLIP loss at a fixed temperature on unnormalised
    embeddings. ``kind="contrastive"``: :class:`ContrastiveLoss` (L2-normalised, learned temperature,
    soft or identity targets); with a :class:`NegativeBank` and the batch's rows, the batch is scored
    against itself plus the bank's sampled negatives instead (the ``negatives="all"`` option).
    """

    def __init__(
        self,
        kind: Literal["bleep_soft", "contrastive"] = "contrastive",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        soft_targets: bool = True,
        target_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.fixed_temperature = temperature
        self.contrastive = None
        if kind == "contrastive":
            self.contrastive = ContrastiveLoss(
                init_temperature=temperature,
                learn_temperature=learn_temperature,
                soft_targets=soft_targets,
                target_temperature=target_temperature,
            )
        elif kind != "bleep_soft":
            raise He2stError(f"unknown alignment loss {kind!r}; use 'bleep_soft' or 'contrastive'")

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, bank: NegativeBank | None = None,
        idx: torch.Tensor | None = None, per_spot: bool = False,
    ) -> torch.Tensor:
        """The batch's loss; ``per_spot=True`` (``kind="bleep_soft"`` only): each spot's, ``(B,)``."""
        if self.contrastive is None:
            return bleep_soft_clip_loss(a, b, self.fixed_temperature, per_spot)
        if per_spot:
            raise He2stError("per-spot alignment losses exist for kind='bleep_soft' only")
        if bank is None:
            return self.contrastive(a, b)
        return bank.loss(idx, a, b, self.contrastive.tau())


def multi_positive_nce(
    anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE with several positives per anchor (SupCon form): cosine logits ``(B, M) / τ``;
    each anchor's loss is minus the mean log-probability of its positive candidates.
    ``positives`` ``(B, M)`` is boolean; every anchor needs at least one positive."""
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    log_prob = F.log_softmax(a @ c.T / temperature, dim=1)
    pos = positives.to(log_prob.dtype)
    return -((log_prob * pos).sum(dim=1) / pos.sum(dim=1).clamp(min=1.0)).mean()
