"""Options of NH2ST: he2st's variant (``nh2st``) and the published choices (``nh2st_faithful``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from he2st.methods.configs.common import MethodConfig, TrainConfig, preset


class NH2STConfig(MethodConfig):
    """Options of NH2ST (defaults: he2st's variant; ``nh2st_faithful``: the published choices)."""

    seed: int = Field(0, description="seed of initialisation and shuffling")
    dim: int = Field(256, gt=0, description="width of node embeddings and attention (NH2ST: 512)")
    structure: Literal["he2st", "nh2st"] = Field(
        "he2st", description="layers: 'nh2st' as published (linear encoders, one shared cross-attention); 'he2st' "
        "(projection heads, separate fusion)")
    input_components: int | None = Field(
        256, gt=0, description="project the standardised features on the training spots' top principal axes first "
        "(NH2ST: None)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout in encoders, neighbour layers and the head (structure='he2st'; NH2ST: "
        "none)")
    neighbours: bool = Field(
        True, description="NH2ST's neighbour branch (expression hypergraph, fusion, InfoNCE); False: spot-level only")
    neighbour_k: int = Field(
        8, gt=0, description="physical neighbours per spot, same sample only (NH2ST: 9 nearest incl. the spot)")
    max_distance_um: float | None = Field(
        None, gt=0, description="ignore neighbours farther than this (µm); None: no limit")
    neighbour_layer: Literal["hypergraph", "attention"] = Field(
        "hypergraph", description="layer over the neighbourhood: NH2ST's k-NN hypergraph convolution or "
        "self-attention")
    neighbour_depth: int = Field(
        2, gt=0, description="hypergraph convolutions / attention blocks (NH2ST: 2 convolutions)")
    hyperedge_k: int = Field(
        3, gt=0, description="nodes per hyperedge: a node and its hyperedge_k - 1 cosine-nearest nodes (NH2ST: 4)")
    hyperedges: Literal["per_modality", "image"] = Field(
        "per_modality", description="'image': hyperedges built on the image nodes, reused for expression (NH2ST); "
        "'per_modality': each its own")
    neighbour_heads: int = Field(4, gt=0, description="attention heads for neighbour_layer='attention'")
    fusion: bool = Field(
        True, description="cross-attention between pathology and expression; False: contrast unfused embeddings")
    neighbour_fusion: Literal["pooled", "nodes"] = Field(
        "pooled", description="'pooled': the neighbourhood is averaged, then fused (NH2ST); 'nodes': fused node by "
        "node, then pooled")
    fusion_heads: int = Field(8, gt=0, description="heads of the cross-attention (NH2ST: 8)")
    fusion_depth: int = Field(1, gt=0, description="cross-attention layers (NH2ST: 1)")
    fusion_mlp_ratio: float = Field(1.0, gt=0, description="MLP width / dim in the cross-attention (NH2ST: 1)")
    fusion_dropout: float = Field(0.5, ge=0, lt=1, description="dropout in the cross-attention (NH2ST: 0.5)")
    contrastive: bool = Field(True, description="InfoNCE terms; False: regression only")
    symmetric_infonce: bool = Field(
        True, description="InfoNCE in both directions; False: image -> expression only (NH2ST)")
    temperature: float = Field(0.05, gt=0, description="InfoNCE τ (NH2ST: 0.05)")
    negative_weight: float = Field(0.1, gt=0, description="factor on negative-pair similarities (NH2ST: 0.1)")
    target_weight: float = Field(1.0, ge=0, description="weight of the target-spot InfoNCE (NH2ST: 1.0)")
    neighbour_weight: float = Field(0.5, ge=0, description="weight of the neighbourhood InfoNCE (NH2ST: 0.5)")
    regression_weight: float = Field(1.0, ge=0, description="weight of the MSE regression loss (NH2ST: 1.0)")
    head_hidden: int = Field(256, gt=0, description="hidden width of the regression head (NH2ST: 256)")
    head_neighbour_context: bool = Field(
        True, description="the regression head also reads the pooled neighbour images; False: the spot's only "
        "(NH2ST)")
    standardize_targets: bool = Field(
        True, description="regress per-gene z-scores (training statistics); predictions return to the panel's "
        "scale (NH2ST: False)")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=100, batch_size=64, lr=5e-4, weight_decay=1e-4, patience=15),
        description="optimiser and early stopping (NH2ST: Adam 5e-4, StepLR(50, 0.9), batch 8, 200 epochs, "
        "patience 20)")

    @model_validator(mode="after")
    def _consistent(self) -> NH2STConfig:
        heads = [self.fusion_heads] + ([self.neighbour_heads] if self.neighbour_layer == "attention" else [])
        for h in heads:
            if self.dim % h:
                raise ValueError(f"dim={self.dim} is not divisible by {h} attention heads")
        if self.neighbour_layer != "hypergraph" and (self.hyperedges == "image" or self.structure == "nh2st"):
            raise ValueError("hyperedges='image' and structure='nh2st' need neighbour_layer='hypergraph'")
        if self.structure == "nh2st" and self.neighbour_fusion != "pooled":
            raise ValueError("structure='nh2st' fuses the pooled neighbourhood (neighbour_fusion='pooled')")
        return self


NH2STFaithfulConfig = preset(
    NH2STConfig, "NH2STFaithfulConfig", "NH2ST as published (docs/methods/nh2st_faithful.md).",
    dim=512, input_components=None, structure="nh2st", hyperedge_k=4, hyperedges="image", symmetric_infonce=False,
    head_neighbour_context=False, standardize_targets=False,
    # NH2ST's early stopping: any validation gain restarts its patience
    train=TrainConfig(epochs=200, batch_size=8, lr=5e-4, weight_decay=0.0, patience=20, min_delta=0.0,
                      grad_clip=None, schedule="step", step_epochs=50, gamma=0.9),
)
