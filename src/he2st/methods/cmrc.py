"""CMRCNet (Liu et al., arXiv 2506.08854): BLEEP's contrastive alignment plus cross-modal masked
reconstruction.

Training: image and expression embeddings are aligned contrastively, as in BLEEP. In addition the
image *tokens* of a spot are randomly masked, attend to *expression tokens* of the same spot, and
the result must reconstruct the spot's *unmasked* image embedding (MSE); the total loss is
``log(1 + L_con) + log(1 + L_rec)``. Because the target is the image embedding that retrieval uses,
the reconstruction shapes the image tower. Prediction: BLEEP retrieval (image embedding -> nearest
reference expression embeddings -> the average of their profiles); the reconstruction branch is
training-only.

Two presets share this code (every difference, with the published values: docs/faithful_methods.md):

* ``cmrcnet_faithful`` -- the published choices: BLEEP projection heads on both sides, BLEEP's
  soft-target loss at τ = 1 on unnormalised embeddings with ``log(1 + ·)`` taken per spot before the
  batch mean; expression tokens from one Linear-ELU-AlphaDropout(0.25) layer (8 x 256); image tokens
  projected to 256 and masked element-wise with probability 0.5, on every spot of a batch; a plain
  4-head attention in which the masked image tokens query the expression tokens (no residual, norm or
  MLP); one fusion block
  applied twice with shared weights (image self-attention + MLP, then MCFN cross-attention to the
  expression tokens, which pass unchanged: one-way); the mean of the image stream is the
  reconstruction; AdamW lr 1e-4 cosine-decayed to 1e-5 over 60 epochs, weight decay 1e-3, batch 64,
  no gradient clipping, every epoch run and the best one kept; top-50 plain average.
  Unavoidable differences on he2st's CPU path: the image embedding is a projection head on the frozen
  encoder's pooled vector (CMRCNet: the mean of its ViT's 50 tokens, trained from scratch), the image
  tokens are a cached pooled grid of the frozen encoder's spatial map or, without one, chunks of the
  pooled vector; the kept epoch is chosen by the validation Pearson of the predictions on spots of
  training patients (CMRCNet: lowest loss on a random 80/20 split of training spots); fp32 and no EMA
  copy (CMRCNet keeps one but does not use it). The published end-to-end recipe runs through
  ``finetune_encoder=True, encoder="vit_base_patch32_224", encoder_pretrained=False`` (tokens: the
  ViT's 49 patch tokens; embedding: the encoder's own pooling) -- a GPU path: on one CPU thread a
  step of 64 patches takes about 37 s, i.e. about 17 minutes per her2st LOPO epoch.
* ``cmrcnet`` (he2st's variant) -- differs from the faithful preset in: he2st's improved-BLEEP
  alignment (L2-normalised embeddings, learned τ from 0.07, a bank of every training spot as
  negatives with soft targets from measured expression similarity, ``log(1 + ·)`` of the batch mean),
  an MLP expression encoder, softmax-weighted retrieval; the reconstruction branch
  (``reconstructor="he2st"``): expression tokens from a Linear-SELU-AlphaDropout-Linear MLP, a
  learned position embedding on the image tokens, a pre-norm cross-attention block with residual and
  MLP, one bidirectional fusion block, and a linear map of the mean of *both* streams; tokens 128 wide;
  masks of exactly 50% of the entries; the reconstruction term on a random half of each batch (these
  three choices cut an epoch at 10,000 spots from about 17 s to under 5 s, and on her2st raised HEG-50
  from 0.085 to 0.098 LOPO and from 0.087 to 0.092 LOSO); AdamW lr 1e-3 constant, weight decay 1e-3,
  gradient clipping at 5, batch 128, early stopping after 10 epochs without improvement.

Image tokens on the frozen path: ``spots.tokens`` ``(N, T, C)`` (a small pooled grid of the encoder's
spatial tokens, standardised per channel with training statistics), or -- when the spots carry no
grid -- the standardised feature vector split into ``feature_chunks`` consecutive chunks, each with
its own projection (a shared one mixed unrelated channels, so the reconstruction ignored the image:
its error stayed flat as more of it was masked). Tokens are needed only for training.
``reconstruction_fraction`` < 1 computes the reconstruction term on a share of each batch, trading
accuracy for speed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import TrainLog, preset
from he2st.methods.features import FeatureScaler
from he2st.methods.finetune import FinetuneConfig, patch_batch, trainable_encoder
from he2st.methods.losses import AlignmentLoss, NegativeBank
from he2st.methods.masking import apply_mask, feature_chunks, random_mask
from he2st.methods.nn import (
    BidirectionalFusion,
    CrossAttentionBlock,
    ExpressionTokenizer,
    OneWayFusionBlock,
    ProjectionHead,
    TokenwiseLinear,
    expression_tower,
)
from he2st.methods.registry import register_method
from he2st.methods.retrieval import RetrievalConfig, RetrievalMethod
from he2st.methods.training import TrainConfig, fit_minibatches

#: dropout of CMRCNet's SNN expression block and of its fusion's MCFN cross-attention (fixed in its code)
CMRCNET_SNN_DROPOUT = 0.25


class CMRCNetConfig(RetrievalConfig, FinetuneConfig):
    """Options of CMRCNet (contrastive and retrieval options: RetrievalConfig; end-to-end training of
    the image encoder: FinetuneConfig)."""

    reconstruction: bool = Field(
        True,
        description="cross-modal masked reconstruction; False = contrastive only "
        "(the improved BLEEP with one head), the ablation of CMRCNet's contribution",
    )
    reconstructor: Literal["he2st", "cmrcnet"] = Field(
        "he2st",
        description="'cmrcnet': the branch as published -- expression tokens from one "
        "Linear-ELU-AlphaDropout layer, a plain multi-head attention (masked image tokens query the "
        "expression tokens; no residual, norm or MLP), one fusion block applied fusion_depth times with "
        "shared weights (image self-attention + MLP, then MCFN cross-attention to the expression tokens, "
        "which pass unchanged), and the mean of the image stream as the reconstruction (no output layer; "
        "attention_dim = projection_dim). 'he2st': "
        "SNN MLP expression tokens, a pre-norm cross-attention block, fusion_depth independent bidirectional "
        "blocks, a linear map of the mean of both streams",
    )
    mask_ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fraction of image-token entries masked (CMRCNet: 0.5); exactly round(ratio * n) per "
        "spot, or the probability of each entry for mask_mode='bernoulli'",
    )
    mask_mode: Literal["element", "token", "bernoulli"] = Field(
        "element",
        description="'element': exactly round(ratio * n) single entries of the projected tokens are zeroed; "
        "'bernoulli': each entry is zeroed with probability mask_ratio (CMRCNet's code); 'token': whole "
        "tokens are replaced by a learned mask token (MAE-style)",
    )
    feature_chunks: int = Field(
        8,
        gt=0,
        description="number of image tokens made by splitting the frozen feature vector when the spots "
        "carry no token grid (spots.tokens is None); each chunk has its own projection",
    )
    attention_dim: int = Field(
        128, gt=0, description="width of image/expression tokens in the reconstruction branch (CMRCNet: 256, "
        "the embedding's width; he2st: 128, a quarter of the attention blocks' cost, which dominates an epoch)"
    )
    expression_tokens: int = Field(8, gt=0, description="number of expression tokens T_e (CMRCNet: 8)")
    expression_token_hidden: int = Field(
        1024, gt=0, description="hidden width of the expression-token MLP (reconstructor='he2st')")
    self_normalising: bool = Field(
        True,
        description="SELU + AlphaDropout in the expression-token MLP (reconstructor='he2st'; CMRCNet's SNN "
        "block is one Linear-ELU-AlphaDropout layer); False: GELU + dropout",
    )
    token_positions: bool = Field(
        True, description="learned position embedding added to the image tokens (reconstructor='he2st'; "
        "CMRCNet's ViT tokens carry their own)")
    cross_heads: int = Field(
        4, gt=0, description="heads of the image-to-expression cross-attention (CMRCNet: 4)"
    )
    fusion_heads: int = Field(8, gt=0, description="heads of the fusion blocks (CMRCNet: 8)")
    fusion_depth: int = Field(
        1, ge=0, description="reconstructor='he2st': number of independent bidirectional fusion blocks (he2st: 1, "
        "after the cross-attention block); 'cmrcnet': how often its one shared one-way block is applied (CMRCNet: 2)")
    fusion_mlp_ratio: float = Field(4.0, gt=0, description="MLP width / token width in the attention blocks")
    attention_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the attention blocks")
    detach_target: bool = Field(
        False,
        description="stop gradients into the reconstruction target; True leaves the "
        "image tower (and so retrieval) untouched by the reconstruction",
    )
    reconstruction_weight: float = Field(1.0, ge=0, description="weight of the reconstruction term")
    reconstruction_fraction: float = Field(
        0.5, gt=0, le=1, description="share of each batch's spots (drawn anew each step) that the "
        "reconstruction term is computed on: an unbiased estimate of its batch mean at a fraction of the "
        "cost, which the attention blocks dominate; 1: every spot (CMRCNet)")
    log_losses: bool = Field(
        True, description="total = log(1+L_con) + w log(1+L_rec) (CMRCNet); False: L_con + w L_rec"
    )
    log_per_spot: bool = Field(
        False, description="take log(1+.) of each spot's contrastive loss before the batch mean, as "
        "CMRCNet's code does (loss='bleep_soft' only); False: of the batch mean")
    per_sample: bool = Field(
        False, description="retrieve top_k within each reference sample and average the samples (as knn and bleep "
        "do); off by default, as published: on her2st it gave cmrcnet +0.002 HEG-50 leave-one-patient-out and "
        "-0.006 leave-one-section-out")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3),
        description="optimiser and early stopping (CMRCNet: batch 64, AdamW lr 1e-4 cosine-decayed to 1e-5, "
        "wd 1e-3, 60 epochs)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CMRCNetConfig:
        if self.log_per_spot and self.loss != "bleep_soft":
            raise ValueError("log_per_spot needs loss='bleep_soft'")
        if self.reconstructor == "cmrcnet" and self.attention_dim != self.projection_dim:
            raise ValueError("reconstructor='cmrcnet' reconstructs the embedding from the token mean: "
                             "attention_dim must equal projection_dim")
        if self.finetune_encoder and self.negatives == "all" and self.loss == "contrastive":
            raise ValueError(
                "finetune_encoder needs negatives='batch' (the bank re-embeds every spot each epoch)")
        return self


CMRCNetFaithfulConfig = preset(
    CMRCNetConfig, "CMRCNetFaithfulConfig", "CMRCNet as published (see the module docstring).",
    loss="bleep_soft", temperature=1.0, learn_temperature=False, negatives="batch",
    expression_encoder="projection", weighting="average", reconstructor="cmrcnet", mask_mode="bernoulli",
    log_per_spot=True, attention_dim=256, fusion_depth=2, reconstruction_fraction=1.0,
    train=TrainConfig(epochs=60, batch_size=64, lr=1e-4, weight_decay=1e-3, patience=60, grad_clip=None,
                      schedule="cosine", min_lr=1e-5),
)


class MaskedReconstructor(nn.Module):
    """Masked image tokens attend to expression tokens; the pooled latent predicts the image embedding
    (he2st's or CMRCNet's block structure: ``reconstructor``)."""

    def __init__(
        self, token_dim: int, n_tokens: int, n_genes: int, out_dim: int, cfg: CMRCNetConfig,
        chunks: bool = False,
    ) -> None:
        super().__init__()
        dim = cfg.attention_dim
        for heads in (cfg.cross_heads, cfg.fusion_heads):
            if dim % heads:
                raise He2stError(f"attention_dim={dim} is not divisible by {heads} heads")
        self.published = cfg.reconstructor == "cmrcnet"
        self.fusion_depth = cfg.fusion_depth
        # chunks of one feature vector: each its own projection (see TokenwiseLinear); spatial tokens: shared
        self.token_proj = TokenwiseLinear(n_tokens, token_dim, dim) if chunks else nn.Linear(token_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim)) if cfg.mask_mode == "token" else None
        self.positions = None
        if self.published:
            self.expression_tokens = ExpressionTokenizer(
                n_genes, cfg.expression_tokens, dim, None, CMRCNET_SNN_DROPOUT)
            self.cross = nn.MultiheadAttention(dim, cfg.cross_heads, batch_first=True)
            self.fusion = OneWayFusionBlock(
                dim, cfg.fusion_heads, cfg.fusion_mlp_ratio, cfg.attention_dropout, CMRCNET_SNN_DROPOUT)
            self.out = nn.Identity()
            return
        if cfg.token_positions:
            self.positions = nn.Parameter(torch.zeros(1, n_tokens, dim))
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
        if self.published:
            x = self.cross(x, e, e, need_weights=False)[0]
            for _ in range(self.fusion_depth):
                x = self.fusion(x, e)
            return self.out(x.mean(dim=1))
        x = self.cross(x, e)
        x, e = self.fusion(x, e)
        return self.out(torch.cat([x, e], dim=1).mean(dim=1))


class CMRCNetModule(nn.Module):
    """Image tower (optional trainable encoder + projection head, used at prediction), expression
    tower, and the training-only reconstruction branch."""

    def __init__(
        self, image_dim: int, n_genes: int, token_dim: int, n_tokens: int, cfg: CMRCNetConfig,
        encoder: nn.Module | None = None, chunks: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = ProjectionHead(image_dim, cfg.projection_dim, cfg.dropout)
        self.expression_tower = expression_tower(
            cfg.expression_encoder, n_genes, cfg.projection_dim, cfg.mlp_hidden, cfg.dropout
        )
        self.reconstructor = (
            MaskedReconstructor(token_dim, n_tokens, n_genes, cfg.projection_dim, cfg, chunks)
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
        if train.tokens is not None and not self.config.finetune_encoder:
            n, t, c = train.tokens.shape
            self.token_scaler = FeatureScaler().fit(train.tokens.reshape(n * t, c))

    def sizes(self, train: SpotSet) -> dict[str, int]:
        n_genes = train.targets.shape[1]
        if self.config.finetune_encoder:  # the encoder's own pooled width and spatial tokens
            encoder = trainable_encoder(self.config, self.card, pretrained=False)
            side = encoder.spec.input_size
            with torch.no_grad():
                tokens = encoder.forward_tokens(torch.zeros(1, 3, side, side))
            return {"image_dim": encoder.embed_dim, "n_genes": n_genes,
                    "token_dim": tokens.shape[2], "n_tokens": tokens.shape[1]}
        if self.token_scaler is not None:
            return {"image_dim": train.features.shape[1], "n_genes": n_genes,
                    "token_dim": train.tokens.shape[2], "n_tokens": train.tokens.shape[1]}
        return {"image_dim": train.features.shape[1], "n_genes": n_genes, "chunk_tokens": 1,
                "token_dim": -(-train.features.shape[1] // self.config.feature_chunks),
                "n_tokens": self.config.feature_chunks}

    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        cfg = self.config
        encoder = trainable_encoder(cfg, self.card, pretrained) if cfg.finetune_encoder else None
        self.net = CMRCNetModule(dims["image_dim"], dims["n_genes"], dims["token_dim"], dims["n_tokens"], cfg,
                                 encoder, chunks=bool(dims.get("chunk_tokens", 0)))
        self.align = AlignmentLoss(
            cfg.loss, cfg.temperature, cfg.learn_temperature, cfg.soft_targets, cfg.target_temperature
        )

    def image_tokens(self, spots: SpotSet) -> torch.Tensor | None:
        """Standardised image tokens of ``spots`` ``(N, T, C)`` as used by the reconstruction branch
        (the token grid if training used one, else chunks of the feature vector); None if unavailable.
        Frozen-feature path only: end to end, the tokens come from the encoder (:meth:`_image_batch`)."""
        if self.token_scaler is not None:
            if spots.tokens is None:
                return None
            n, t, c = spots.tokens.shape
            return torch.from_numpy(self.token_scaler(spots.tokens.reshape(n * t, c)).reshape(n, t, c))
        return feature_chunks(torch.from_numpy(self.scaler(spots.features)), self.config.feature_chunks)

    def _image_batch(
        self, spots: SpotSet, idx: torch.Tensor, features: torch.Tensor | None, tokens: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input of the image head and reconstruction tokens of the spots ``idx``: rows of the frozen
        ``features``/``tokens``, or -- end to end -- one encoder pass over their augmented patches
        (pooled as the encoder pools; its spatial tokens, CMRCNet's ViT tokens)."""
        encoder = self.net.encoder
        if encoder is None:
            return features[idx], None if tokens is None else tokens[idx]
        maps = encoder.forward_features(patch_batch(encoder, spots, idx, self.config.augment, generator))
        return encoder.pool(maps), encoder.grid_tokens(maps, round(self.dims["n_tokens"] ** 0.5))

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
        """The contrastive term (per spot with ``log_per_spot``) and the reconstruction MSE (None: off)."""
        img = self.net.image_head(x)
        spot = self.net.expression_tower(y)
        contrastive = self.align(img, spot, bank, idx, per_spot=self.config.log_per_spot)
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
            return contrastive.mean()  # reconstruction off: exactly the contrastive objective
        if cfg.log_losses:
            return torch.log1p(contrastive).mean() + cfg.reconstruction_weight * torch.log1p(reconstruction)
        return contrastive.mean() + cfg.reconstruction_weight * reconstruction

    # ------------------------------------------------------------------ training
    @property
    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        cfg = self.config
        end_to_end = self.net.encoder is not None
        if end_to_end and torch.cuda.is_available():
            self.net.cuda()  # the end-to-end path is meant for a GPU; frozen features train fine on CPU
            self.align.cuda()
        X = None if end_to_end else torch.from_numpy(self.scaler(train.features))
        Y = torch.from_numpy(train.targets.astype(np.float32)).to(self._device)
        tokens = None if end_to_end else self.image_tokens(train)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bank = self.negative_bank(train, gen)
        module = nn.ModuleDict({"net": self.net, "align": self.align})

        def refresh() -> None:
            self.net.eval()
            with torch.no_grad():
                bank.refresh(self.net.image_head(X), self.net.expression_tower(Y))

        def step(idx: torch.Tensor) -> torch.Tensor:
            x, tok = self._image_batch(train, idx, X, tokens, gen)
            con, rec = self._losses(x, Y[idx], tok, gen, bank, idx)
            return self._total(con, rec)

        return fit_minibatches(module, len(train), step, cfg.train, cfg.seed, self.validation(train, val),
                               None if bank is None else refresh)

    @torch.no_grad()
    def embed_images(self, spots: SpotSet, batch: int = 256) -> np.ndarray:
        """Image embeddings (the query side of retrieval): from the frozen features, or end to end from
        the patches through the trained encoder."""
        encoder = self.net.encoder
        if encoder is None:
            return self.embed_frozen(self.net.image_head, spots).numpy()
        self.net.eval()
        rows = [torch.arange(a, min(a + batch, len(spots))) for a in range(0, len(spots), batch)]
        out = [self.net.image_head(encoder(patch_batch(encoder, spots, idx, False, None))).float().cpu()
               for idx in rows]
        return torch.cat(out).numpy() if out else np.zeros((0, self.config.projection_dim), np.float32)


@register_method
class CMRCNetFaithful(CMRCNet):
    """CMRCNet as published: BLEEP's soft-target loss at τ=1 and projection heads, CMRCNet's one-way
    shared fusion, AdamW 1e-4 cosine to 1e-5, batch 64, top-50 average."""

    name = "cmrcnet_faithful"
    Config = CMRCNetFaithfulConfig
    ablations = {"no_reconstruction": {"reconstruction": False}}
