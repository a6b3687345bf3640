"""NH²ST (Qu et al., MICCAI 2025, arXiv 2506.23827): a query branch for the target spot and a
neighbour branch over its physical neighbourhood, cross-attention between pathology and expression,
contrastive alignment, and a regression head that reads images only.

``nh2st_faithful`` keeps the published layers (``structure="nh2st"``) and ``nh2st`` is he2st's variant
(docs/methods/nh2st.md, docs/methods/nh2st_faithful.md: both, and every deviation). Ablations isolate
one idea each: ``no_neighbours`` drops the neighbour branch, ``target_head`` makes the head read the
spot only, ``no_fusion`` and ``no_contrastive`` drop the cross-attention and the InfoNCE terms.

A head that reads neighbour images (``head_neighbour_context``) depends on which spots of a sample are
predicted together: predict whole samples (as the benchmark does).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from he2st.data.spots import SpotSet
from he2st.methods.base import Prediction, TrainLog
from he2st.methods.configs.nh2st import NH2STConfig, NH2STFaithfulConfig
from he2st.methods.layers.losses import info_nce
from he2st.methods.layers.neighbourhood import knn_hypergraph, masked_mean, neighbourhood_layer, spatial_neighbours
from he2st.methods.neural import NeuralMethod
from he2st.methods.layers.nn import BidirectionalFusion, ProjectionHead, SharedFusion
from he2st.methods.registry import register_method
from he2st.methods.training import fit_minibatches


class NH2STModule(nn.Module):
    """Encoders, neighbour layers, cross-attention and regression head of NH2ST (he2st's or NH2ST's
    layers: ``structure``)."""

    def __init__(self, image_dim: int, n_genes: int, cfg: NH2STConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.published = cfg.structure == "nh2st"
        if self.published:
            self.image_encoder = nn.Linear(image_dim, d)
            self.expression_encoder = nn.Sequential(nn.Linear(n_genes, d), nn.Linear(d, d))
        else:
            self.image_encoder = ProjectionHead(image_dim, d, cfg.dropout)
            self.expression_encoder = ProjectionHead(n_genes, d, cfg.dropout)

        def layer(in_dim: int | None = None) -> nn.Module:
            return neighbourhood_layer(cfg.neighbour_layer, d, cfg.neighbour_heads, cfg.neighbour_depth,
                                       cfg.hyperedge_k, cfg.dropout, in_dim, self.published)

        if cfg.neighbours or cfg.head_neighbour_context:
            self.image_neighbourhood = layer(image_dim if self.published else None)
        if cfg.neighbours:
            self.expression_neighbourhood = layer()
        if cfg.fusion and cfg.contrastive:
            if self.published:  # one encoder for the spot and the neighbourhood
                self.target_fusion = SharedFusion(
                    d, cfg.fusion_heads, cfg.fusion_depth, cfg.fusion_mlp_ratio, cfg.fusion_dropout)
            else:

                def fusion() -> BidirectionalFusion:
                    return BidirectionalFusion(
                        d, cfg.fusion_heads, cfg.fusion_depth, cfg.fusion_mlp_ratio, cfg.fusion_dropout
                    )

                self.target_fusion = fusion()
                if cfg.neighbours:
                    self.neighbour_fusion = fusion()
        self.uses_context = cfg.head_neighbour_context
        width = d * (2 if self.uses_context else 1)
        if self.published:
            self.head = nn.Sequential(nn.Linear(width, cfg.head_hidden), nn.Linear(cfg.head_hidden, n_genes))
        else:
            self.head = nn.Sequential(
                nn.Linear(width, cfg.head_hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.head_hidden, n_genes),
            )

    def image_side(
        self, nodes: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``nodes`` ``(B, n, D)`` (node 0 = the spot) -> the spot's embedding, the pooled neighbourhood
        context, the neighbourhood's node tokens and the hypergraph built on them (None where absent)."""
        if self.published:  # NH2ST's hypergraph reads the encoder's features, its head their projection
            spot, inputs = self.image_encoder(nodes[:, 0]), nodes
        else:
            h = self.image_encoder(nodes)
            spot, inputs = h[:, 0], h
        layer = getattr(self, "image_neighbourhood", None)
        if layer is None:
            return spot, None, None, None
        if self.cfg.hyperedges == "image":
            incidence = knn_hypergraph(inputs, valid, self.cfg.hyperedge_k)
            tokens = layer(inputs, valid, incidence)
        else:
            incidence, tokens = None, layer(inputs, valid)
        return spot, masked_mean(tokens, valid), tokens, incidence

    def expression_side(
        self, nodes: torch.Tensor, valid: torch.Tensor, incidence: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expression nodes -> the spot's embedding and the neighbourhood's node tokens (None without the
        neighbour branch); ``incidence``: the image hypergraph to reuse (None: build one here)."""
        h = self.expression_encoder(nodes)
        layer = getattr(self, "expression_neighbourhood", None)
        if layer is None:
            return h[:, 0], None
        return h[:, 0], layer(h, valid) if incidence is None else layer(h, valid, incidence)

    def fuse_spot(self, img: torch.Tensor, spot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention between the spot's image and expression embeddings ``(B, d)`` each."""
        a, b = self.target_fusion(img[:, None], spot[:, None])
        return a[:, 0], b[:, 0]

    def fuse_neighbourhood(
        self, img_tokens: torch.Tensor, spot_tokens: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The neighbourhood's image and expression summaries ``(B, d)`` that its InfoNCE contrasts."""
        if not self.cfg.fusion:
            return masked_mean(img_tokens, valid), masked_mean(spot_tokens, valid)
        if self.cfg.neighbour_fusion == "pooled":  # each side pooled first, then the two tokens fused
            block = self.target_fusion if self.published else self.neighbour_fusion  # NH2ST shares one encoder
            a, b = block(masked_mean(img_tokens, valid)[:, None], masked_mean(spot_tokens, valid)[:, None])
            return a[:, 0], b[:, 0]
        a, b = self.neighbour_fusion(img_tokens, spot_tokens, valid, valid)
        return masked_mean(a, valid), masked_mean(b, valid)

    def regress(self, spot: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.head(torch.cat([spot, context], dim=-1) if self.uses_context else spot)


@register_method
class NH2ST(NeuralMethod):
    """NH2ST: neighbourhood hypergraphs, cross-attention, InfoNCE and a regression head that reads images only."""

    name = "nh2st"
    Config = NH2STConfig
    scales_targets = True
    ablations = {
        "no_neighbours": {"neighbours": False},
        "target_head": {"head_neighbour_context": False},
        "no_fusion": {"fusion": False},
        "no_contrastive": {"contrastive": False},
    }

    def __init__(self, config: NH2STConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.net: NH2STModule | None = None

    @property
    def context_k(self) -> int:
        return self.config.neighbour_k if self.config.head_neighbour_context else 0

    @property
    def training_k(self) -> int:
        """Neighbours each training spot reads (the branch's, or the head's)."""
        return self.config.neighbour_k if self.config.neighbours else self.context_k

    # ------------------------------------------------------------------ neighbourhoods
    def neighbourhoods(self, spots: SpotSet, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Node rows ``(N, 1 + k)`` (the spot, then its physical neighbours in ``spots``), and validity."""
        index, valid = spatial_neighbours(spots.coords_um, spots.sample_ids, k, self.config.max_distance_um)
        rows = np.arange(len(spots))[:, None]
        nodes = np.concatenate([rows, index], axis=1)
        node_valid = np.concatenate([np.ones((len(spots), 1), bool), valid], axis=1)
        return torch.from_numpy(nodes), torch.from_numpy(node_valid)

    def _targets_in(self, targets: np.ndarray) -> np.ndarray:
        return self.target_scaler(targets) if self.target_scaler is not None else targets.astype(np.float32)

    def input_components(self) -> int | None:
        return self.config.input_components

    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        self.net = NH2STModule(dims.get("input_dim", dims["image_dim"]), dims["n_genes"], self.config)

    # ------------------------------------------------------------------ training
    def batch_loss(
        self, image_nodes: torch.Tensor, expression_nodes: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """NH2ST's objective for a batch of neighbourhoods (node 0 = the spot; standardised features and
        the model's targets): ``regression_weight · MSE + target_weight · InfoNCE(spot) +
        neighbour_weight · InfoNCE(neighbourhood)``."""
        cfg = self.config

        def infonce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return info_nce(a, b, cfg.temperature, cfg.negative_weight, cfg.symmetric_infonce)

        img, img_context, img_tokens, incidence = self.net.image_side(image_nodes, valid)
        loss = cfg.regression_weight * F.mse_loss(self.net.regress(img, img_context), expression_nodes[:, 0])
        if not cfg.contrastive:
            return loss
        spot, spot_tokens = self.net.expression_side(expression_nodes, valid, incidence)
        a, b = self.net.fuse_spot(img, spot) if cfg.fusion else (img, spot)
        loss = loss + cfg.target_weight * infonce(a, b)
        if cfg.neighbours and cfg.neighbour_weight > 0:
            pair = self.net.fuse_neighbourhood(img_tokens, spot_tokens, valid)
            loss = loss + cfg.neighbour_weight * infonce(*pair)
        return loss

    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        cfg = self.config
        X = torch.from_numpy(self.scaler(train.features))
        Y = torch.from_numpy(self._targets_in(train.targets))
        nodes, node_valid = self.neighbourhoods(train, self.training_k)  # within training spots, per sample

        def step(idx: torch.Tensor) -> torch.Tensor:
            rows = nodes[idx]
            return self.batch_loss(X[rows], Y[rows], node_valid[idx])

        return fit_minibatches(self.net, len(train), step, cfg.train, cfg.seed, self.validation(train, val))

    @torch.no_grad()
    def _regress(self, spots: SpotSet, batch: int = 512) -> np.ndarray:
        """Expression from the spots' images (and their neighbours' images, within ``spots``, when the
        head reads them)."""
        self.net.eval()
        X = torch.from_numpy(self.scaler(spots.features))
        nodes, node_valid = self.neighbourhoods(spots, self.context_k)
        out = []
        for a in range(0, len(spots), batch):
            rows, valid = nodes[a : a + batch], node_valid[a : a + batch]
            if self.net.uses_context:
                img, context, _, _ = self.net.image_side(X[rows], valid)
            else:
                img, context = self.net.image_encoder(X[rows[:, 0]]), None
            out.append(self.net.regress(img, context))
        pred = torch.cat(out).numpy() if out else np.zeros((0, self.dims["n_genes"]), np.float32)
        if self.target_scaler is not None:
            pred = pred * self.target_scaler.std + self.target_scaler.mean
        return pred.astype(np.float32)

    def _predict(self, spots: SpotSet) -> Prediction:
        return Prediction(self._regress(spots), list(self.panel.genes))


@register_method
class NH2STFaithful(NH2ST):
    """NH2ST as published, on frozen features: its layers, image-built hyperedges, one-way InfoNCE, Adam + StepLR."""

    name = "nh2st_faithful"
    Config = NH2STFaithfulConfig
    ablations = {
        "no_neighbours": {"neighbours": False},
        "no_fusion": {"fusion": False},
        "no_contrastive": {"contrastive": False},
    }
