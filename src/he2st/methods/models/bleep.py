"""BLEEP (Xie et al., NeurIPS 2023): image and expression embeddings aligned contrastively; the
expression of a new spot is the average expression of the reference spots whose *expression*
embeddings are nearest to its *image* embedding.

``bleep_faithful`` keeps the paper's choices. ``bleep``, he2st's variant, normalises the embeddings,
learns the temperature, contrasts each batch with a bank of every training spot, trains 5 heads and
averages each query with its neighbours; each change is an option with an ablation row beside the class.
Both, and every deviation from the publication: docs/methods/bleep.md, docs/methods/bleep_faithful.md.

Image side: frozen cached embeddings through a projection head (CPU path), or the encoder itself
fine-tuned end to end on augmented patches (``finetune_encoder``, the GPU path).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from he2st.data.spots import SpotSet
from he2st.methods.base import TrainLog
from he2st.methods.configs.bleep import BLEEPConfig, BLEEPFaithfulConfig
from he2st.methods.finetune import patch_batch, trainable_encoder
from he2st.methods.layers.losses import ContrastiveLoss, EmbeddingQueue, bleep_soft_clip_loss
from he2st.methods.layers.nn import ProjectionHead, expression_tower
from he2st.methods.registry import register_method
from he2st.methods.retrieval import RetrievalMethod
from he2st.methods.training import fit_minibatches


class BLEEPNet(nn.Module):
    """Image tower (optional trainable encoder + projection head) and expression tower."""

    def __init__(self, image_dim: int, n_genes: int, config: BLEEPConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = ProjectionHead(image_dim, config.projection_dim, config.dropout)
        self.expression_tower = expression_tower(
            config.expression_encoder, n_genes, config.projection_dim, config.mlp_hidden, config.dropout)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: standardised frozen features (B, D), or preprocessed images when an encoder is attached."""
        return self.image_head(self.encoder(x) if self.encoder is not None else x)

    def embed_expression(self, y: torch.Tensor) -> torch.Tensor:
        return self.expression_tower(y)


@register_method
class BLEEP(RetrievalMethod):
    """BLEEP, improved: normalised embeddings, learned temperature, whole-set negatives, 5 heads, neighbour context."""

    name = "bleep"
    Config = BLEEPConfig
    module_attrs = ("nets", "losses")
    scales_targets = True
    ablations = {
        # the whole training set as negatives at every step -> in-batch negatives; with a few in-batch
        # spots the soft targets would be noise, so this row uses plain InfoNCE (identity targets)
        "batch_negatives": {"negatives": "batch", "soft_targets": False},
        "single_model": {"ensemble": 1},
        "bleep_loss": {"loss": "bleep_soft", "temperature": 1.0, "learn_temperature": False},
        "projection_expr": {"expression_encoder": "projection"},
        "average_retrieval": {"weighting": "average"},
        "no_query_context": {"query_neighbours": 0},
        "pooled_retrieval": {"per_sample": False},
    }

    def __init__(self, config: BLEEPConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.nets = nn.ModuleList()
        self.losses = nn.ModuleList()  # one ContrastiveLoss per member (empty for BLEEP's fixed-τ loss)

    # ------------------------------------------------------------------ building blocks
    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        cfg = self.config
        image_dim = dims["image_dim"]
        self.nets, self.losses = nn.ModuleList(), nn.ModuleList()
        for _ in range(cfg.ensemble):
            encoder = None
            if cfg.finetune_encoder:
                encoder = trainable_encoder(cfg, self.card, pretrained)
                image_dim = encoder.embed_dim
            self.nets.append(BLEEPNet(image_dim, dims["n_genes"], cfg, encoder))
            if cfg.loss == "contrastive":
                self.losses.append(ContrastiveLoss(
                    init_temperature=cfg.temperature, learn_temperature=cfg.learn_temperature,
                    soft_targets=cfg.soft_targets, target_temperature=cfg.target_temperature,
                ))

    def _loss(self, member: int, img: torch.Tensor, spot: torch.Tensor, queues: tuple | None = None) -> torch.Tensor:
        if not len(self.losses):
            return bleep_soft_clip_loss(img, spot, self.config.temperature)
        loss_fn = self.losses[member]
        if queues is not None and len(queues[0]):
            return loss_fn(img, spot, queues[0].tensor(), queues[1].tensor())
        return loss_fn(img, spot)

    def _image_inputs(self, net: BLEEPNet, spots: SpotSet, idx: torch.Tensor, train: bool,
                      gen: torch.Generator | None) -> torch.Tensor:
        """Standardised features, or (end to end) augmented + preprocessed patches."""
        if net.encoder is not None:
            return patch_batch(net.encoder, spots, idx, train and self.config.augment, gen)
        return torch.from_numpy(self.scaler(spots.features[idx.numpy()])).to(self._device)

    # ------------------------------------------------------------------ training
    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        """All heads train together, each on its own batch composition (a fixed permutation of the spots
        per head), so that early stopping follows the ensemble's own validation Pearson."""
        cfg = self.config
        if cfg.finetune_encoder and torch.cuda.is_available():
            self.nets.cuda()  # the end-to-end path is meant for a GPU; frozen features train fine on CPU
            self.losses.cuda()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = len(train)
        perms = [torch.arange(n)] + [torch.randperm(n, generator=gen) for _ in range(len(self.nets) - 1)]
        targets = torch.from_numpy(self._expression_inputs(train.targets)).to(self._device)
        negatives = cfg.negatives if cfg.loss == "contrastive" else "batch"
        if negatives == "all" and cfg.finetune_encoder:
            negatives = "queue"  # re-embedding every patch each epoch is not affordable end to end
        queues = [(EmbeddingQueue(cfg.projection_dim, cfg.queue_size), EmbeddingQueue(cfg.projection_dim, cfg.queue_size))
                  for _ in self.nets] if negatives == "queue" else None
        banks = [self.negative_bank(train, gen) for _ in self.nets] if negatives == "all" else None
        features = torch.from_numpy(self.scaler(train.features)) if banks else None

        def refresh() -> None:
            with torch.no_grad():
                for net, bank in zip(self.nets, banks, strict=True):
                    net.eval()
                    bank.refresh(_batched(net.embed_images, features), _batched(net.embed_expression, targets))

        def step(idx: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(())
            for member, net in enumerate(self.nets):
                rows = perms[member][idx]
                img = net.embed_images(self._image_inputs(net, train, rows, True, gen))
                spot = net.embed_expression(targets[rows])
                if banks is not None:
                    loss = banks[member].loss(rows, img, spot, self.losses[member].tau())
                else:
                    loss = self._loss(member, img, spot, None if queues is None else queues[member])
                    if queues is not None:
                        queues[member][0].enqueue(nn.functional.normalize(img.detach(), dim=-1))
                        queues[member][1].enqueue(nn.functional.normalize(spot.detach(), dim=-1))
                total = total + loss
            return total / len(self.nets)

        module = nn.ModuleDict({"nets": self.nets, "losses": self.losses})
        return fit_minibatches(module, n, step, cfg.train, cfg.seed, self.validation(train, val),
                               refresh if banks else None)

    @property
    def _device(self) -> torch.device:
        return next(self.nets.parameters()).device

    def _expression_inputs(self, expression: np.ndarray) -> np.ndarray:
        return expression if self.target_scaler is None else self.target_scaler(expression)

    def _joint(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """One member: its embedding. Several: normalised embeddings concatenated and scaled by
        1/sqrt(M), so a cosine similarity of the joint vectors is the mean of the members' cosines."""
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([nn.functional.normalize(o, dim=-1) for o in outputs], dim=-1) / len(outputs) ** 0.5

    @torch.no_grad()
    def embed_expression(self, expression: np.ndarray, batch: int = 1024) -> np.ndarray:
        self.nets.eval()
        out = []
        for a in range(0, len(expression), batch):
            y = torch.from_numpy(self._expression_inputs(expression[a : a + batch])).to(self._device)
            out.append(self._joint([net.embed_expression(y) for net in self.nets]).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed_images(self, spots: SpotSet, batch: int = 256) -> np.ndarray:
        self.nets.eval()
        out = []
        for a in range(0, len(spots), batch):
            idx = torch.arange(a, min(a + batch, len(spots)))
            out.append(self._joint(
                [net.embed_images(self._image_inputs(net, spots, idx, False, None)) for net in self.nets]).float().cpu())
        return torch.cat(out).numpy()


@register_method
class BLEEPFaithful(BLEEP):
    """BLEEP as published: soft-target CLIP loss at τ=1, projection heads, top-50 average."""

    name = "bleep_faithful"
    Config = BLEEPFaithfulConfig
    ablations = {}


def _batched(fn, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """``fn`` over ``x`` in batches (bounded memory when refreshing a bank of every training spot)."""
    return torch.cat([fn(x[a : a + batch]) for a in range(0, len(x), batch)])
