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

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Method, MethodConfig, Prediction, TrainLog
from he2st.methods.features import FeatureScaler
from he2st.methods.losses import ContrastiveLoss, EmbeddingQueue, bleep_soft_clip_loss
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
    queue_size: int = Field(1024, ge=0, description="memory queue of past embeddings used as negatives (0 = off)")
    k: int = Field(50, gt=0, description="reference spots retrieved per query")
    weighting: Literal["average", "softmax", "similarity"] = Field("softmax", description="BLEEP: average")
    weighting_temperature: float = 0.05
    finetune_encoder: bool = Field(False, description="train the image encoder end to end on patches (GPU path)")
    encoder: str | None = Field(None, description="encoder preset for finetune_encoder (default: the embedding encoder)")
    augment: bool = True
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3))


class BLEEPFaithfulConfig(BLEEPConfig):
    """BLEEP exactly as published (see module docstring)."""

    expression_encoder: Literal["projection", "mlp"] = "projection"
    loss: Literal["bleep_soft", "contrastive"] = "bleep_soft"
    temperature: float = 1.0
    learn_temperature: bool = False
    queue_size: int = 0
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


class BLEEP(Method):
    name = "bleep"
    Config = BLEEPConfig
    retrieval = True

    def __init__(self, config: BLEEPConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.net: BLEEPNet | None = None
        self.scaler = FeatureScaler()
        self.bank: ReferenceBank | None = None
        self.loss_fn: nn.Module | None = None

    # ------------------------------------------------------------------ building blocks
    def _build(self, image_dim: int, n_genes: int) -> None:
        cfg = self.config
        encoder = None
        if cfg.finetune_encoder:
            from he2st.encoders import create

            encoder = create(cfg.encoder or "efficientnet_lite0")
            encoder.set_trainable(True)
            image_dim = encoder.embed_dim
        self.net = BLEEPNet(image_dim, n_genes, cfg, encoder)
        if cfg.loss == "contrastive":
            self.loss_fn = ContrastiveLoss(
                init_temperature=cfg.temperature, learn_temperature=cfg.learn_temperature,
                soft_targets=cfg.soft_targets, target_temperature=cfg.target_temperature,
            )
        else:
            self.loss_fn = None

    def _loss(self, img: torch.Tensor, spot: torch.Tensor, queues: tuple | None = None) -> torch.Tensor:
        if self.loss_fn is None:
            return bleep_soft_clip_loss(img, spot, self.config.temperature)
        if queues is not None and len(queues[0]):
            return self.loss_fn(img, spot, queues[0].tensor(), queues[1].tensor())
        return self.loss_fn(img, spot)

    def _image_inputs(self, spots: SpotSet, idx: torch.Tensor | None, train: bool, gen: torch.Generator | None):
        """Standardised features, or (end to end) augmented + preprocessed patches."""
        if self.net is not None and self.net.encoder is not None:
            if spots.patches is None:
                raise He2stError("finetune_encoder needs patches (load spots with with_patches=True)")
            patches = torch.from_numpy(spots.patches if idx is None else spots.patches[idx.numpy()])
            if train and self.config.augment:
                from he2st.augment import augment_batch

                patches = augment_batch(patches, gen)
            return self.net.encoder.preprocess(patches)
        feats = spots.features if idx is None else spots.features[idx.numpy()]
        return torch.from_numpy(self.scaler(feats))

    # ------------------------------------------------------------------ the interface
    def fit(self, train: SpotSet, val: SpotSet | None = None) -> TrainLog:
        if train.targets is None:
            raise He2stError("training spots need targets")
        torch.manual_seed(self.config.seed)
        self.scaler.fit(train.features)
        self._build(train.features.shape[1], train.targets.shape[1])
        net, cfg = self.net, self.config
        module = nn.ModuleDict({"net": net} | ({"loss": self.loss_fn} if self.loss_fn is not None else {}))
        targets = torch.from_numpy(train.targets)
        queues = None
        if cfg.queue_size and cfg.loss == "contrastive":
            queues = (EmbeddingQueue(cfg.projection_dim, cfg.queue_size), EmbeddingQueue(cfg.projection_dim, cfg.queue_size))
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def step(idx: torch.Tensor) -> torch.Tensor:
            img = net.embed_images(self._image_inputs(train, idx, True, gen))
            spot = net.embed_expression(targets[idx])
            loss = self._loss(img, spot, queues)
            if queues is not None:
                queues[0].enqueue(nn.functional.normalize(img.detach(), dim=-1))
                queues[1].enqueue(nn.functional.normalize(spot.detach(), dim=-1))
            return loss

        def validate() -> float:
            assert val is not None and val.targets is not None
            losses, b = [], cfg.train.batch_size
            for a in range(0, len(val), b):
                idx = torch.arange(a, min(a + b, len(val)))
                if len(idx) < 2:
                    continue
                img = net.embed_images(self._image_inputs(val, idx, False, None))
                spot = net.embed_expression(torch.from_numpy(val.targets[idx.numpy()]))
                losses.append(float(self._loss(img, spot)) * len(idx))
            return sum(losses) / max(1, len(val))

        log = fit_minibatches(module, len(train), step, cfg.train, cfg.seed,
                              validate if val is not None and len(val) > 1 else None)
        reference = train if val is None else SpotSet.concat([train, val])
        self.set_reference(reference.targets, reference.genes, list(reference.sample_ids))
        return log

    @torch.no_grad()
    def embed_expression(self, expression: np.ndarray, batch: int = 1024) -> np.ndarray:
        self.net.eval()
        out = [self.net.embed_expression(torch.from_numpy(expression[a : a + batch])) for a in range(0, len(expression), batch)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed_images(self, spots: SpotSet, batch: int = 256) -> np.ndarray:
        self.net.eval()
        out = []
        for a in range(0, len(spots), batch):
            idx = torch.arange(a, min(a + batch, len(spots)))
            out.append(self.net.embed_images(self._image_inputs(spots, idx, False, None)))
        return torch.cat(out).numpy()

    def set_reference(self, panel_expression: np.ndarray, genes: list[str], sample_ids: list[str],
                      output_expression: np.ndarray | None = None, output_genes: list[str] | None = None) -> None:
        """Reference bank = expression embeddings of reference spots (training spots, and any
        expression-only sections from training patients); ``output_expression`` optionally returns
        more genes (e.g. the whole transcriptome) than the model was trained on."""
        embeddings = self.embed_expression(panel_expression)
        self.bank = ReferenceBank(
            embeddings,
            panel_expression if output_expression is None else output_expression,
            genes if output_genes is None else output_genes,
            sample_ids,
        )

    def predict(self, spots: SpotSet) -> Prediction:
        if self.bank is None:
            raise He2stError(f"method {self.name} has not been fitted")
        self.check_spots(spots)
        result = self.bank.predict(
            self.embed_images(spots), k=min(self.config.k, len(self.bank)), weighting=self.config.weighting,
            temperature=self.config.weighting_temperature,
        )
        return Prediction(result.expression, result.genes, {
            "best_similarity": result.best_similarity, "dispersion": result.dispersion})

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()} | self.scaler.state()
        if self.loss_fn is not None:
            state["loss.log_temperature"] = self.loss_fn.log_temperature.detach()
        state["dims"] = torch.tensor([self.scaler.mean.shape[0], _in_features(self.net.expression_tower)])
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        image_dim = int(state["dims"][0])
        n_genes = int(state["dims"][1])
        self._build(image_dim, n_genes)
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        if self.loss_fn is not None and "loss.log_temperature" in state:
            self.loss_fn.log_temperature.data.copy_(state["loss.log_temperature"])
        self.scaler = FeatureScaler.from_state(state)


class BLEEPFaithful(BLEEP):
    name = "bleep_faithful"
    Config = BLEEPFaithfulConfig


def _in_features(module: nn.Module) -> int:
    """Input width of a tower (its first Linear layer)."""
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features
