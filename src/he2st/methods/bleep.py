"""BLEEP (Xie et al., NeurIPS 2023): image and expression embeddings aligned contrastively;
expression of a new spot = average expression of the reference spots whose *expression*
embeddings are nearest to its *image* embedding.

Two presets share this code:

* ``bleep_faithful`` -- the paper's choices: BLEEP projection heads on both sides (the expression
  vector goes straight into a projection head), the soft-target CLIP loss at temperature 1 on
  unnormalised embeddings, AdamW (lr 1e-3, wd 1e-3), batch 256, plain average of the top-50
  reference profiles by cosine similarity.
* ``bleep`` (he2st's default, "improved") -- L2-normalised embeddings with a learnable temperature,
  a memory queue of past embeddings as extra negatives (so results do not hinge on batch size,
  BLEEP's known single-GPU failure), an MLP expression encoder, and similarity-weighted retrieval.
  Each change can be switched off on its own (see :class:`BLEEPConfig`) for ablations.

Image side: frozen cached embeddings through a projection head (CPU path), or the encoder itself
fine-tuned end to end on augmented patches (``finetune_encoder``, the GPU path).
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Method, MethodConfig, Prediction, TrainLog
from he2st.methods.blocks import RetrievalMixin
from he2st.methods.features import FeatureScaler
from he2st.methods.losses import (
    ContrastiveLoss,
    EmbeddingQueue,
    bleep_soft_clip_loss,
    expression_similarity_targets,
    reference_contrastive_loss,
)
from he2st.methods.nn import MLPEncoder, ProjectionHead
from he2st.predict.retrieval import ReferenceBank
from he2st.train import TrainConfig, fit_minibatches


class BLEEPConfig(MethodConfig):
    """Options of BLEEP (defaults = he2st's improved variant)."""

    projection_dim: int = Field(256, description="joint embedding size (BLEEP: 256)")
    dropout: float = 0.1
    expression_encoder: Literal["projection", "mlp"] = Field("mlp", description="BLEEP: projection")
    mlp_hidden: list[int] = Field(default_factory=lambda: [512])
    loss: Literal["bleep_soft", "contrastive"] = Field(
        "contrastive", description="bleep_soft: BLEEP's loss (unnormalised, fixed τ); contrastive: L2-normalised"
    )
    temperature: float = Field(0.07, description="τ (BLEEP: 1.0); initial value when learned")
    learn_temperature: bool = True
    soft_targets: bool = Field(True, description="BLEEP's soft targets (else identity / InfoNCE)")
    target_temperature: float = 0.1
    negatives: Literal["batch", "queue", "all"] = Field(
        "all",
        description="extra negatives beyond the batch: 'queue' = memory queue of past embeddings, 'all' = every "
        "training spot re-embedded (detached) each step (frozen-feature path; falls back to 'queue' end to end)",
    )
    queue_size: int = Field(1024, ge=0, description="size of the memory queue for negatives='queue'")
    k: int = Field(50, gt=0, description="reference spots retrieved per query")
    weighting: Literal["average", "softmax", "similarity"] = Field("softmax", description="BLEEP: average")
    weighting_temperature: float = 0.05
    query_neighbours: int = Field(
        0, ge=0, description="average each query's image embedding with its k physically nearest spots' "
        "(same slide, predicted together; see RetrievalConfig); 0: off (BLEEP)")
    finetune_encoder: bool = Field(False, description="train the image encoder end to end on patches (GPU path)")
    encoder: str | None = Field(None, description="encoder preset for finetune_encoder (default: the embedding encoder)")
    encoder_weights: str | None = Field(None, description="local weights for that encoder")
    encoder_pretrained: bool = Field(True, description="start fine-tuning from pretrained weights")
    augment: bool = True
    standardize_expression: bool = Field(
        False, description="z-score each gene (training statistics) before the expression tower (BLEEP: False)")
    ensemble: int = Field(5, gt=0, description="independently seeded heads whose cosine similarities are averaged")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3))


class BLEEPFaithfulConfig(BLEEPConfig):
    """BLEEP exactly as published (see module docstring)."""

    expression_encoder: Literal["projection", "mlp"] = "projection"
    loss: Literal["bleep_soft", "contrastive"] = "bleep_soft"
    temperature: float = 1.0
    learn_temperature: bool = False
    negatives: Literal["batch", "queue", "all"] = "batch"
    ensemble: int = 1
    weighting: Literal["average", "softmax", "similarity"] = "average"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=60, batch_size=256, lr=1e-3, weight_decay=1e-3))


class BLEEPNet(nn.Module):
    """Image tower (optional trainable encoder + projection head) and expression tower."""

    def __init__(self, image_dim: int, n_genes: int, config: BLEEPConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = ProjectionHead(image_dim, config.projection_dim, config.dropout)
        if config.expression_encoder == "mlp":
            self.expression_tower: nn.Module = MLPEncoder(
                n_genes, hidden=tuple(config.mlp_hidden), out_dim=config.projection_dim, dropout=config.dropout
            )
        else:
            self.expression_tower = ProjectionHead(n_genes, config.projection_dim, config.dropout)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: standardised frozen features (B, D), or preprocessed images when an encoder is attached."""
        return self.image_head(self.encoder(x) if self.encoder is not None else x)

    def embed_expression(self, y: torch.Tensor) -> torch.Tensor:
        return self.expression_tower(y)


class BLEEP(RetrievalMixin, Method):
    """BLEEP, improved: normalised embeddings, learned temperature, whole-set negatives, ensemble."""

    name = "bleep"
    Config = BLEEPConfig
    uses_bank = True

    def __init__(self, config: BLEEPConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.nets = nn.ModuleList()
        self.losses = nn.ModuleList()  # one ContrastiveLoss per member (empty for BLEEP's fixed-τ loss)
        self.scaler = FeatureScaler()
        self.expression_scaler: FeatureScaler | None = None
        self.bank: ReferenceBank | None = None

    # ------------------------------------------------------------------ building blocks
    def _build(self, image_dim: int, n_genes: int, pretrained: bool = True) -> None:
        cfg = self.config
        self.nets, self.losses = nn.ModuleList(), nn.ModuleList()
        for _ in range(cfg.ensemble):
            encoder = None
            if cfg.finetune_encoder:
                from he2st.encoders import create

                default = json.loads(self.encoder_spec).get("name") if self.encoder_spec else None
                encoder = create(cfg.encoder or default or "efficientnet_lite0", weights=cfg.encoder_weights,
                                 pretrained=pretrained and cfg.encoder_pretrained)
                encoder.set_trainable(True)
                image_dim = encoder.embed_dim
            self.nets.append(BLEEPNet(image_dim, n_genes, cfg, encoder))
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
            if spots.patches is None:
                raise He2stError("finetune_encoder needs patches (load spots with with_patches=True)")
            patches = torch.from_numpy(spots.patches[idx.numpy()])
            if train and self.config.augment:
                from he2st.augment import augment_batch

                patches = augment_batch(patches, gen)
            return net.encoder.preprocess(patches)
        return torch.from_numpy(self.scaler(spots.features[idx.numpy()])).to(self._device)

    # ------------------------------------------------------------------ the interface
    def fit(self, train: SpotSet, val: SpotSet | None = None) -> TrainLog:
        if train.targets is None:
            raise He2stError("training spots need targets")
        torch.manual_seed(self.config.seed)
        self.scaler.fit(train.features)
        self.expression_scaler = FeatureScaler().fit(train.targets) if self.config.standardize_expression else None
        self._build(train.features.shape[1], train.targets.shape[1])
        if self.config.finetune_encoder and torch.cuda.is_available():
            self.nets.cuda()  # the end-to-end path is meant for a GPU; frozen features train fine on CPU
            self.losses.cuda()
        log = TrainLog()
        for member in range(len(self.nets)):
            member_log = self._fit_member(member, train, val)
            for key, values in member_log.curves.items():
                log.curves[f"{key}" if member == 0 else f"{key}_{member}"] = values
            log.best_epoch = member_log.best_epoch if member == 0 else log.best_epoch
            log.seconds += member_log.seconds
        reference = train if val is None else SpotSet.concat([train, val])
        self.set_reference(reference.targets, reference.genes, list(reference.sample_ids))
        return log

    def _fit_member(self, member: int, train: SpotSet, val: SpotSet | None) -> TrainLog:
        cfg = self.config
        seed = cfg.seed + 1000 * member
        net = self.nets[member]
        module = nn.ModuleDict({"net": net} | ({"loss": self.losses[member]} if len(self.losses) else {}))
        targets = torch.from_numpy(self._expression_inputs(train.targets)).to(self._device)
        negatives = cfg.negatives if cfg.loss == "contrastive" else "batch"
        if negatives == "all" and net.encoder is not None:
            negatives = "queue"  # re-embedding every patch each step is not affordable end to end
        queues = None
        if negatives == "queue":
            queues = (EmbeddingQueue(cfg.projection_dim, cfg.queue_size), EmbeddingQueue(cfg.projection_dim, cfg.queue_size))
        all_features = z_all = None
        if negatives == "all":
            all_features = torch.from_numpy(self.scaler(train.features))
            z = (train.targets - train.targets.mean(0)) / np.maximum(train.targets.std(0), 1e-6)
            z_all = torch.from_numpy(z.astype(np.float32))
        gen = torch.Generator().manual_seed(seed + 1)

        def step(idx: torch.Tensor) -> torch.Tensor:
            img = net.embed_images(self._image_inputs(net, train, idx, True, gen))
            spot = net.embed_expression(targets[idx])
            if all_features is not None:
                loss_fn = self.losses[member]
                soft = expression_similarity_targets(z_all[idx], z_all, cfg.target_temperature)
                return reference_contrastive_loss(
                    img, spot, net.embed_images(all_features), net.embed_expression(targets), soft,
                    loss_fn.log_temperature.clamp(*loss_fn.log_bounds).exp(),
                )
            loss = self._loss(member, img, spot, queues)
            if queues is not None:
                queues[0].enqueue(nn.functional.normalize(img.detach(), dim=-1))
                queues[1].enqueue(nn.functional.normalize(spot.detach(), dim=-1))
            return loss

        def validate() -> float:
            losses, b = [], cfg.train.batch_size
            for a in range(0, len(val), b):
                idx = torch.arange(a, min(a + b, len(val)))
                if len(idx) < 2:
                    continue
                img = net.embed_images(self._image_inputs(net, val, idx, False, None))
                spot = net.embed_expression(
                    torch.from_numpy(self._expression_inputs(val.targets[idx.numpy()])).to(self._device))
                losses.append(float(self._loss(member, img, spot)) * len(idx))
            return sum(losses) / max(1, len(val))

        return fit_minibatches(module, len(train), step, cfg.train, seed,
                               validate if val is not None and len(val) > 1 else None)

    @property
    def _device(self) -> torch.device:
        return next(self.nets.parameters()).device

    def _expression_inputs(self, expression: np.ndarray) -> np.ndarray:
        return expression if self.expression_scaler is None else self.expression_scaler(expression)

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

    def _predict(self, spots: SpotSet) -> Prediction:
        return self._retrieve(spots)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        state = {f"nets.{k}": v.cpu() for k, v in self.nets.state_dict().items()}
        state |= {f"losses.{k}": v.cpu() for k, v in self.losses.state_dict().items()} | self.scaler.state()
        if self.expression_scaler is not None:
            state |= self.expression_scaler.state("expression_scaler")
        state["dims"] = torch.tensor([self.scaler.mean.shape[0], _in_features(self.nets[0].expression_tower)])
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._build(int(state["dims"][0]), int(state["dims"][1]), pretrained=False)  # weights come from state
        self.nets.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("nets.")})
        self.losses.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("losses.")})
        self.scaler = FeatureScaler.from_state(state)
        if "expression_scaler.mean" in state:
            self.expression_scaler = FeatureScaler.from_state(state, "expression_scaler")
        self.nets.eval()


class BLEEPFaithful(BLEEP):
    """BLEEP as published: soft-target CLIP loss at τ=1, projection heads, top-50 average."""

    name = "bleep_faithful"
    Config = BLEEPFaithfulConfig


def _in_features(module: nn.Module) -> int:
    """Input width of a tower (its first Linear layer)."""
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features
