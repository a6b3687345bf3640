"""Options of CMRCNet: he2st's variant (``cmrcnet``) and the published choices (``cmrcnet_faithful``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from he2st.methods.configs.common import FinetuneConfig, RetrievalConfig, TrainConfig, preset


class CMRCNetConfig(RetrievalConfig, FinetuneConfig):
    """Options of CMRCNet (defaults: he2st's variant; contrastive and retrieval options as RetrievalConfig,
    end-to-end training of the image encoder as FinetuneConfig)."""

    reconstruction: bool = Field(
        True, description="cross-modal masked reconstruction; False: contrastive only (the ablation of CMRCNet's idea)")
    reconstructor: Literal["he2st", "cmrcnet"] = Field(
        "he2st", description="reconstruction branch: 'cmrcnet' as published; 'he2st' with residual blocks and "
        "bidirectional fusion")
    mask_ratio: float = Field(0.5, ge=0, lt=1, description="fraction of image-token entries masked (CMRCNet: 0.5)")
    mask_mode: Literal["element", "token", "bernoulli"] = Field(
        "element", description="'element': exactly that fraction of entries; 'bernoulli': each entry by chance; "
        "'token': whole tokens")
    feature_chunks: int = Field(
        8, gt=0, description="image tokens cut from the frozen feature vector when the spots carry no token grid")
    attention_dim: int = Field(
        128, gt=0, description="width of the reconstruction branch's tokens (CMRCNet: 256, the embedding's width)")
    expression_tokens: int = Field(8, gt=0, description="number of expression tokens (CMRCNet: 8)")
    expression_token_hidden: int = Field(
        1024, gt=0, description="hidden width of the expression-token MLP (reconstructor='he2st')")
    self_normalising: bool = Field(
        True, description="SELU + AlphaDropout in the expression-token MLP (reconstructor='he2st'); False: GELU + "
        "dropout")
    token_positions: bool = Field(
        True, description="learned position embedding added to the image tokens (reconstructor='he2st')")
    cross_heads: int = Field(4, gt=0, description="heads of the image-to-expression cross-attention (CMRCNet: 4)")
    fusion_heads: int = Field(8, gt=0, description="heads of the fusion blocks (CMRCNet: 8)")
    fusion_depth: int = Field(
        1, ge=0, description="'he2st': independent fusion blocks; 'cmrcnet': passes of its one shared block "
        "(CMRCNet: 2)")
    fusion_mlp_ratio: float = Field(4.0, gt=0, description="MLP width / token width in the attention blocks")
    attention_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the attention blocks")
    detach_target: bool = Field(
        False, description="stop gradients into the reconstruction target (the image tower then ignores the "
        "reconstruction)")
    reconstruction_weight: float = Field(1.0, ge=0, description="weight of the reconstruction term")
    reconstruction_fraction: float = Field(
        0.5, gt=0, le=1, description="share of each batch's spots, drawn anew each step, that the reconstruction "
        "term is computed on")
    log_losses: bool = Field(
        True, description="total = log(1+L_con) + w log(1+L_rec) (CMRCNet); False: L_con + w L_rec")
    log_per_spot: bool = Field(
        False, description="take log(1+.) of each spot's contrastive loss before the batch mean (CMRCNet; "
        "loss='bleep_soft')")
    per_sample: bool = Field(
        False, description="retrieve top_k within each reference sample and average the samples; False: one pooled "
        "top_k (CMRCNet)")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3),
        description="optimiser and early stopping (CMRCNet: batch 64, AdamW lr 1e-4 cosine to 1e-5, wd 1e-3, 60 "
        "epochs)")

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
    CMRCNetConfig, "CMRCNetFaithfulConfig", "CMRCNet as published (docs/methods/cmrcnet_faithful.md).",
    loss="bleep_soft", temperature=1.0, learn_temperature=False, negatives="batch",
    expression_encoder="projection", weighting="average", reconstructor="cmrcnet", mask_mode="bernoulli",
    log_per_spot=True, attention_dim=256, fusion_depth=2, reconstruction_fraction=1.0,
    train=TrainConfig(epochs=60, batch_size=64, lr=1e-4, weight_decay=1e-3, patience=60, grad_clip=None,
                      schedule="cosine", min_lr=1e-5),
)
