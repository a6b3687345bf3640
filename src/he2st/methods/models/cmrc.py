"""CMRCNet (Liu et al., arXiv 2506.08854): BLEEP's contrastive alignment plus cross-modal masked
reconstruction.

A spot's image tokens are randomly masked, attend to expression tokens of the same spot, and must
reconstruct the spot's unmasked image embedding (MSE); the loss is ``log(1 + L_con) + log(1 + L_rec)``.
The target is the embedding retrieval uses, so the reconstruction shapes the image tower; it runs in
training only, and prediction is BLEEP's retrieval.

Image tokens on the frozen path: ``spots.tokens`` ``(N, T, C)`` (a pooled grid of the encoder's spatial
tokens, standardised per channel on training statistics) or, without a grid, the standardised feature
vector cut into ``feature_chunks`` chunks, each with its own projection so that the reconstruction has
to read the image. ``cmrcnet_faithful`` keeps the published choices and ``cmrcnet`` is he2st's variant
(docs/methods/cmrcnet.md, docs/methods/cmrcnet_faithful.md: both, and every deviation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import TrainLog
from he2st.methods.configs.cmrc import CMRCNetConfig, CMRCNetFaithfulConfig
from he2st.methods.layers.features import FeatureScaler
from he2st.methods.finetune import patch_batch, trainable_encoder
from he2st.methods.layers.losses import AlignmentLoss, NegativeBank
from he2st.methods.layers.masking import apply_mask, feature_chunks, random_mask
from he2st.methods.layers.nn import (
    BidirectionalFusion,
    CrossAttentionBlock,
    ExpressionTokenizer,
    OneWayFusionBlock,
    ProjectionHead,
    TokenwiseLinear,
    expression_tower,
)
from he2st.methods.registry import register_method
from he2st.methods.retrieval import RetrievalMethod
from he2st.methods.training import fit_minibatches

#: dropout of CMRCNet's SNN expression block and of its fusion's MCFN cross-attention (fixed in its code)
CMRCNET_SNN_DROPOUT = 0.25


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
    """CMRCNet: BLEEP's contrastive alignment plus cross-modal masked reconstruction; retrieval at inference."""

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
    """CMRCNet as published: BLEEP's loss at τ=1, CMRCNet's one-way shared fusion, AdamW 1e-4 cosine, batch 64."""

    name = "cmrcnet_faithful"
    Config = CMRCNetFaithfulConfig
    ablations = {"no_reconstruction": {"reconstruction": False}}
