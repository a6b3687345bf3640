"""CMRCNet (Liu et al., arXiv 2506.08854): BLEEP's contrastive alignment plus cross-modal masked
reconstruction.

Training: image and expression embeddings are aligned contrastively, as in BLEEP. In addition the
image *tokens* of a spot are randomly masked, attend to *expression tokens* of the same spot
(expression vector -> self-normalising MLP -> ``T_e`` tokens) through one cross-attention block
and fusion blocks (bidirectional here; one-way and weight-shared in CMRCNet's code), and the
mean-pooled result must reconstruct the spot's *unmasked* image embedding (MSE). The total loss is ``log(1 + L_con) + log(1 + L_rec)``. Because the target is
the image embedding that retrieval uses, the reconstruction shapes the image tower: the embedding
must be predictable from half of the image plus the expression, i.e. carry what expression explains.

Prediction: BLEEP retrieval. Only the image side runs (image embedding -> nearest reference
expression embeddings -> their profiles); the reconstruction branch is training-only.

Frozen-feature path (he2st's CPU path; CMRCNet trains its ViT from scratch):

* the image embedding is a projection head on the frozen pooled feature vector;
* image tokens come from ``spots.tokens`` ``(N, T, C)`` -- a small pooled grid of the encoder's
  spatial tokens, standardised per channel with training statistics -- and, when the spots carry
  no tokens, from the standardised feature vector split into ``feature_chunks`` consecutive chunks
  (:func:`~he2st.methods.masking.feature_chunks`; a stand-in that keeps the mechanism, not CMRCNet's
  spatial masking). Tokens are needed only for training, never for prediction.

Defaults follow he2st's improved BLEEP for the contrastive and retrieval parts (normalised
embeddings, learned τ, every training spot as a negative, softmax-weighted retrieval, lr 1e-3,
batch 128), so ``reconstruction=False`` is the improved BLEEP with one head and the ablation
isolates the reconstruction. CMRCNet as published: ``loss="bleep_soft", temperature=1,
learn_temperature=False, negatives="batch", expression_encoder="projection", weighting="average",
``, batch 64, lr 1e-4. ``reconstruction_fraction`` < 1 computes the reconstruction term on a share of
each batch, trading accuracy for speed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import TrainLog
from he2st.methods.features import FeatureScaler
from he2st.methods.losses import AlignmentLoss, NegativeBank
from he2st.methods.masking import apply_mask, feature_chunks, random_mask
from he2st.methods.nn import (
    BidirectionalFusion,
    CrossAttentionBlock,
    ExpressionTokenizer,
    ProjectionHead,
    expression_tower,
)
from he2st.methods.registry import register_method
from he2st.methods.retrieval import RetrievalConfig, RetrievalMethod
from he2st.methods.training import TrainConfig, fit_minibatches


class CMRCNetConfig(RetrievalConfig):
    """Options of CMRCNet (contrastive and retrieval options: see RetrievalConfig)."""

    reconstruction: bool = Field(
        True,
        description="cross-modal masked reconstruction; False = contrastive only "
        "(the improved BLEEP with one head), the ablation of CMRCNet's contribution",
    )
    mask_ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fraction of image-token entries masked (CMRCNet: 0.5); "
        "exactly round(ratio * n) per spot",
    )
    mask_mode: Literal["element", "token"] = Field(
        "element",
        description="'element': single entries of the projected tokens are zeroed (CMRCNet); 'token': "
        "whole tokens are replaced by a learned mask token (MAE-style)",
    )
    feature_chunks: int = Field(
        8,
        gt=0,
        description="number of image tokens made by splitting the frozen feature "
        "vector when the spots carry no token grid (spots.tokens is None)",
    )
    attention_dim: int = Field(
        256, gt=0, description="width of image/expression tokens in the reconstruction branch"
    )
    expression_tokens: int = Field(8, gt=0, description="number of expression tokens T_e (CMRCNet: 8)")
    expression_token_hidden: int = Field(1024, gt=0, description="hidden width of the expression-token MLP")
    self_normalising: bool = Field(
        True,
        description="SELU + AlphaDropout in the expression-token MLP (CMRCNet's SNN "
        "block); False: GELU + dropout",
    )
    token_positions: bool = Field(True, description="learned position embedding added to the image tokens")
    cross_heads: int = Field(
        4, gt=0, description="heads of the image-to-expression cross-attention (CMRCNet: 4)"
    )
    fusion_heads: int = Field(8, gt=0, description="heads of the bidirectional fusion blocks (CMRCNet's fusion: 8)")
    fusion_depth: int = Field(
        2, ge=0, description="number of independent bidirectional fusion blocks (he2st's design; CMRCNet applies one "
        "one-way block -- image self- then cross-attention, expression tokens unchanged -- twice with shared weights)")
    fusion_mlp_ratio: float = Field(4.0, gt=0, description="MLP width / token width in the attention blocks")
    attention_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the attention blocks")
    detach_target: bool = Field(
        False,
        description="stop gradients into the reconstruction target; True leaves the "
        "image tower (and so retrieval) untouched by the reconstruction",
    )
    reconstruction_weight: float = Field(1.0, ge=0, description="weight of the reconstruction term")
    reconstruction_fraction: float = Field(
        1.0, gt=0, le=1, description="share of each batch's spots (drawn anew each step) that the "
        "reconstruction term is computed on: an unbiased estimate of its batch mean at a fraction of the "
        "cost, which the attention blocks dominate; 1: every spot (CMRCNet). On her2st LOPO, 0.5 and 0.25 "
        "cost 0.007 and 0.014 HEG-50 for 1.5x and 2x faster epochs")
    log_losses: bool = Field(
        True, description="total = log(1+L_con) + w log(1+L_rec) (CMRCNet); False: L_con + w L_rec"
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3),
        description="optimiser and early stopping (CMRCNet: batch 64, AdamW lr 1e-4, wd 1e-3, 60 epochs)",
    )


class MaskedReconstructor(nn.Module):
    """Masked image tokens attend to expression tokens; the pooled latent predicts the image embedding."""

    def __init__(self, token_dim: int, n_tokens: int, n_genes: int, out_dim: int, cfg: CMRCNetConfig) -> None:
        super().__init__()
        dim = cfg.attention_dim
        for heads in (cfg.cross_heads, cfg.fusion_heads):
            if dim % heads:
                raise He2stError(f"attention_dim={dim} is not divisible by {heads} heads")
        self.token_proj = nn.Linear(token_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim)) if cfg.mask_mode == "token" else None
        self.positions = nn.Parameter(torch.zeros(1, n_tokens, dim)) if cfg.token_positions else None
        self.expression_tokens = ExpressionTokenizer(
            n_genes,
            cfg.expression_tokens,
            dim,
            cfg.expression_token_hidden,
            cfg.attention_dropout,
            cfg.self_normalising,
        )
        self.cross = CrossAttentionBlock(dim, cfg.cross_heads, cfg.fusion_mlp_ratio, cfg.attention_dropout)
        self.fusion = BidirectionalFusion(
            dim, cfg.fusion_heads, cfg.fusion_depth, cfg.fusion_mlp_ratio, cfg.attention_dropout
        )
        self.out = nn.Linear(dim, out_dim)
        if self.positions is not None:
            nn.init.trunc_normal_(self.positions, std=0.02)

    def forward(self, tokens: torch.Tensor, expression: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, T, C)``, ``expression`` ``(B, G)``, ``mask`` ``(B, T, dim)`` (True = masked)
        -> reconstructed image embedding ``(B, out_dim)``."""
        x = apply_mask(self.token_proj(tokens), mask, self.mask_token)
        if self.positions is not None:
            x = x + self.positions
        e = self.expression_tokens(expression)
        x = self.cross(x, e)
        x, e = self.fusion(x, e)
        return self.out(torch.cat([x, e], dim=1).mean(dim=1))


class CMRCNetModule(nn.Module):
    """Image head (used at prediction), expression tower, and the training-only reconstruction branch."""

    def __init__(
        self, image_dim: int, n_genes: int, token_dim: int, n_tokens: int, cfg: CMRCNetConfig
    ) -> None:
        super().__init__()
        self.image_head = ProjectionHead(image_dim, cfg.projection_dim, cfg.dropout)
        self.expression_tower = expression_tower(
            cfg.expression_encoder, n_genes, cfg.projection_dim, cfg.mlp_hidden, cfg.dropout
        )
        self.reconstructor = (
            MaskedReconstructor(token_dim, n_tokens, n_genes, cfg.projection_dim, cfg)
            if cfg.reconstruction
            else None
        )


@register_method
class CMRCNet(RetrievalMethod):
    """BLEEP contrastive alignment + cross-modal masked reconstruction; BLEEP retrieval at inference."""

    name = "cmrcnet"
    Config = CMRCNetConfig
    uses_tokens = True
    module_attrs = ("net", "align")
    scaler_attrs = ("scaler", "target_scaler", "token_scaler")
    ablations = {
        "no_reconstruction": {"reconstruction": False},
        "batch_negatives": {"negatives": "batch", "soft_targets": False},
    }

    def __init__(self, config: CMRCNetConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.net: CMRCNetModule | None = None
        self.align: AlignmentLoss | None = None
        self.token_scaler: FeatureScaler | None = None  # set when training used spots.tokens

    # ------------------------------------------------------------------ pieces
    def fit_scalers(self, train: SpotSet) -> None:
        super().fit_scalers(train)
        self.token_scaler = None
        if train.tokens is not None:
            n, t, c = train.tokens.shape
            self.token_scaler = FeatureScaler().fit(train.tokens.reshape(n * t, c))

    def sizes(self, train: SpotSet) -> dict[str, int]:
        if self.token_scaler is not None:
            token_dim, n_tokens = train.tokens.shape[2], train.tokens.shape[1]
        else:
            token_dim, n_tokens = -(-train.features.shape[1] // self.config.feature_chunks), self.config.feature_chunks
        return {"image_dim": train.features.shape[1], "n_genes": train.targets.shape[1],
                "token_dim": token_dim, "n_tokens": n_tokens}

    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        cfg = self.config
        self.net = CMRCNetModule(dims["image_dim"], dims["n_genes"], dims["token_dim"], dims["n_tokens"], cfg)
        self.align = AlignmentLoss(
            cfg.loss, cfg.temperature, cfg.learn_temperature, cfg.soft_targets, cfg.target_temperature
        )

    def image_tokens(self, spots: SpotSet) -> torch.Tensor | None:
        """Standardised image tokens of ``spots`` ``(N, T, C)`` as used by the reconstruction branch
        (the token grid if training used one, else chunks of the feature vector); None if unavailable."""
        if self.token_scaler is not None:
            if spots.tokens is None:
                return None
            n, t, c = spots.tokens.shape
            return torch.from_numpy(self.token_scaler(spots.tokens.reshape(n * t, c)).reshape(n, t, c))
        return feature_chunks(torch.from_numpy(self.scaler(spots.features)), self.config.feature_chunks)

    def mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reconstruction mask ``(batch, T, attention_dim)`` for this model (True = masked)."""
        return random_mask(
            (batch, self.dims["n_tokens"], self.config.attention_dim),
            self.config.mask_ratio,
            self.config.mask_mode,
            generator,
        )

    def _losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        tokens: torch.Tensor | None,
        generator: torch.Generator | None,
        bank: NegativeBank | None = None,
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = self.net.image_head(x)
        spot = self.net.expression_tower(y)
        contrastive = self.align(img, spot, bank, idx)
        if self.net.reconstructor is None or tokens is None:
            return contrastive, None
        target = img.detach() if self.config.detach_target else img
        share = self.config.reconstruction_fraction
        if share < 1 and self.net.training:
            rows = torch.randperm(len(x), generator=generator)[: max(1, round(share * len(x)))]
            tokens, y, target = tokens[rows], y[rows], target[rows]
        reconstructed = self.net.reconstructor(tokens, y, self.mask(len(y), generator))
        return contrastive, F.mse_loss(reconstructed, target)

    def _total(self, contrastive: torch.Tensor, reconstruction: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if reconstruction is None:
            return contrastive  # reconstruction off: exactly the contrastive objective
        if cfg.log_losses:
            return torch.log1p(contrastive) + cfg.reconstruction_weight * torch.log1p(reconstruction)
        return contrastive + cfg.reconstruction_weight * reconstruction

    # ------------------------------------------------------------------ training
    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        cfg = self.config
        X = torch.from_numpy(self.scaler(train.features))
        Y = torch.from_numpy(train.targets.astype(np.float32))
        tokens = self.image_tokens(train)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bank = self.negative_bank(train, gen)
        module = nn.ModuleDict({"net": self.net, "align": self.align})

        def refresh() -> None:
            self.net.eval()
            with torch.no_grad():
                bank.refresh(self.net.image_head(X), self.net.expression_tower(Y))

        def step(idx: torch.Tensor) -> torch.Tensor:
            con, rec = self._losses(X[idx], Y[idx], None if tokens is None else tokens[idx], gen, bank, idx)
            return self._total(con, rec)

        return fit_minibatches(module, len(train), step, cfg.train, cfg.seed, self.validation(train, val),
                               None if bank is None else refresh)

    def embed_images(self, spots: SpotSet) -> np.ndarray:
        """Image embeddings from the frozen features alone (the query side of retrieval)."""
        return self.embed_frozen(self.net.image_head, spots).numpy()
