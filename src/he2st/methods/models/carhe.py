"""CarHE ("Contrastive Alignment of gene expRession for H&E", bioRxiv 2025): contrastive
image-expression alignment with two transfer mechanisms, and prediction by retrieval.

Only the abstract is public, so this is he2st's reading (docs/methods/carhe.md). (a) Cell-type
transfer: per-spot cell-type proportions (``extras``, NMF expression programmes of the training spots,
or Tangram on a single-cell reference) are a third modality aligned with the other two, and a head
predicts them from the image. (b) Histology transfer: image-image InfoNCE between augmented views of a
spot and its physical neighbours, after a histology-only warm-up that unlabelled spots can join.

Prediction retrieves from a bank of expression embeddings, which can return more genes than the panel.
Each query is averaged with its neighbours (``query_neighbours``), so predictions depend on which spots
of a slide are predicted together: pass whole slides.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Prediction, TrainLog
from he2st.methods.configs.carhe import CarHEConfig
from he2st.methods.layers.deconvolution import tangram_proportions
from he2st.methods.distributed import gather
from he2st.methods.layers.features import clean_proportions
from he2st.methods.layers.losses import AlignmentLoss, multi_positive_nce
from he2st.methods.layers.masking import feature_augment
from he2st.methods.layers.neighbourhood import sample_neighbour, spatial_neighbours
from he2st.methods.layers.nn import MLPEncoder, expression_tower
from he2st.methods.neural import WORST_VALIDATION_SCORE, ValidationSpots
from he2st.methods.registry import register_method
from he2st.methods.retrieval import RetrievalMethod
from he2st.methods.training import fit_minibatches
from he2st.stats import mean_sample_pearson


class CarHEModule(nn.Module):
    """Image tower (+ histology projector, proportion head), expression tower, proportion tower."""

    def __init__(self, image_dim: int, n_genes: int, n_types: int, cfg: CarHEConfig) -> None:
        super().__init__()
        p = cfg.projection_dim
        self.image_tower = MLPEncoder(
            image_dim, hidden=tuple(cfg.image_hidden), out_dim=p, dropout=cfg.dropout
        )
        self.expression_tower = expression_tower(
            cfg.expression_encoder, n_genes, p, cfg.mlp_hidden, cfg.dropout
        )
        if n_types:
            self.proportion_tower = MLPEncoder(
                n_types, hidden=tuple(cfg.proportion_hidden), out_dim=p, dropout=cfg.dropout
            )
            self.proportion_head = nn.Sequential(
                nn.Linear(p, cfg.proportion_head_hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.proportion_head_hidden, n_types),
            )
        if cfg.histology_transfer:
            self.histology_projector = nn.Sequential(nn.Linear(p, p), nn.GELU(), nn.Linear(p, p))


@register_method
class CarHE(RetrievalMethod):
    """CarHE: image-expression-proportion alignment, histology transfer, retrieval from a whole-transcriptome bank."""

    name = "carhe"
    Config = CarHEConfig
    module_attrs = ("net", "aligns")
    ablations = {
        "no_celltype_transfer": {"celltype_transfer": False},
        "no_histology_transfer": {"histology_transfer": False},
        "no_query_context": {"query_neighbours": 0},
        "batch_negatives": {"negatives": "batch", "soft_targets": False},
    }

    def __init__(self, config: CarHEConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.net: CarHEModule | None = None
        self.aligns = nn.ModuleDict()

    @property
    def learns_from_unlabelled(self) -> bool:
        """Unlabelled images join the histology-only warm-up and term, when histology transfer is on."""
        return self.config.histology_transfer

    def _celltype_source(self, spots: SpotSet) -> str:
        """'extras', 'programmes', 'reference' or 'none': what the third modality is made of for these
        training spots."""
        cfg = self.config
        if not cfg.celltype_transfer:
            return "none"
        if cfg.celltypes_from == "reference":
            return "reference"
        if cfg.celltypes_from != "programmes" and cfg.celltype_key in spots.extras:
            return "extras"
        if cfg.celltypes_from == "extras":
            raise He2stError(
                f"carhe: training spots have no extras[{cfg.celltype_key!r}] (cell-type proportions); load them, "
                "or set celltypes_from=programmes (or auto), or celltype_transfer=false")
        return "programmes"

    @property
    def proportion_key(self) -> str:
        """The extras key predictions carry: the cell types trained on, the reference's, or the programmes."""
        if self.dims.get("programmes"):
            return "expression_programmes"
        return "reference_celltypes" if self.dims.get("reference") else self.config.celltype_key

    def _derived_proportions(self, spots: SpotSet, source: str) -> np.ndarray:
        """Proportions derived from the training spots themselves (expression programmes, or deconvolution
        against the reference, recorded for the model card); the same spots give the same result, so it is kept."""
        cached = getattr(self, "_derived_cache", None)
        if cached is not None and cached[0] is spots.targets:
            return cached[1]
        if source == "programmes":
            props = self._programme_loadings(spots)
            self.celltypes_record = {"source": "programmes", "programmes": int(props.shape[1])}
        else:
            cfg = self.config
            result = tangram_proportions(cfg.celltype_reference, cfg.celltype_key, spots.targets, spots.genes, cfg.seed)
            props, self.celltypes_record = result.proportions, {"source": "reference"} | result.record
        self._derived_cache = (spots.targets, props)
        return props

    def _programme_loadings(self, spots: SpotSet) -> np.ndarray:
        """Each training spot's NMF expression-programme loadings, normalised to sum to 1 (fitted on these
        training targets only). NMF reads non-negative values: a gene that goes below zero (targets centred
        within samples) is shifted up by its minimum, which keeps its pattern where clipping would flatten it."""
        targets = np.asarray(spots.targets, dtype=np.float64)
        targets = targets - np.minimum(targets.min(axis=0), 0.0)
        nmf = NMF(n_components=min(self.config.programmes, targets.shape[1]), init="nndsvda", max_iter=500,
                  random_state=self.config.seed)
        with warnings.catch_warnings():  # loadings short of full convergence still describe the programmes
            warnings.simplefilter("ignore", ConvergenceWarning)
            loadings = nmf.fit_transform(targets)
        total = loadings.sum(axis=1, keepdims=True)
        return np.divide(loadings, total, out=np.zeros_like(loadings), where=total > 0).astype(np.float32)

    def _proportions(self, spots: SpotSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cleaned training proportions and their usable-row mask (None without cell-type transfer)."""
        cfg = self.config
        source = self._celltype_source(spots)
        if source == "none":
            return None
        raw = spots.extras[cfg.celltype_key] if source == "extras" else self._derived_proportions(spots, source)
        props, ok = clean_proportions(raw)
        if ok.sum() < 2:
            raise He2stError(f"carhe: fewer than 2 training spots have usable {cfg.celltype_key} proportions")
        return torch.from_numpy(props), torch.from_numpy(ok)

    def sizes(self, train: SpotSet) -> dict[str, int]:
        props = self._proportions(train)
        return {"image_dim": train.features.shape[1], "n_genes": train.targets.shape[1],
                "n_types": 0 if props is None else int(props[0].shape[1]),
                "programmes": int(self._celltype_source(train) == "programmes"),
                "reference": int(self._celltype_source(train) == "reference")}

    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        cfg = self.config
        n_types = dims["n_types"]
        self.net = CarHEModule(dims["image_dim"], dims["n_genes"], n_types, cfg)

        def align() -> AlignmentLoss:
            return AlignmentLoss(
                cfg.loss, cfg.temperature, cfg.learn_temperature, cfg.soft_targets, cfg.target_temperature
            )

        self.aligns = nn.ModuleDict({"image_expression": align()})
        if n_types:
            self.aligns["proportion_image"] = align()
            self.aligns["proportion_expression"] = align()

    # ------------------------------------------------------------------ losses
    def _histology_loss(
        self,
        pool: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor,
        rows: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Multi-positive InfoNCE: view 1 of each anchor against [view 2 of every anchor, one augmented
        physical neighbour of every anchor]; positives = the same spot or one of its physical neighbours."""
        cfg = self.config
        partners = sample_neighbour(index, valid, rows, gen)
        x = torch.cat([pool[rows], pool[rows], pool[partners]])
        views = feature_augment(x, cfg.augment_dropout, cfg.augment_noise, gen)
        z = self.net.histology_projector(self.net.image_tower(views))
        b = len(rows)
        anchors, candidates = z[:b], z[b:]
        ids = torch.cat([rows, partners])
        positives = ids[None, :] == rows[:, None]
        if index.shape[1]:
            near = (ids[None, None, :] == index[rows][:, :, None]) & valid[rows][:, :, None]
            positives |= near.any(dim=1)
        return multi_positive_nce(anchors, candidates, positives, cfg.histology_temperature)

    def _celltype_loss(
        self, img: torch.Tensor, spot: torch.Tensor, props: torch.Tensor, ok: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.config
        # the whole batch's usable rows (gathered under several processes): the alignments below gather across
        # processes, so a process that skipped them alone would leave the others waiting
        every = gather(ok.to(torch.int64))
        n_ok = int(every.sum())
        if n_ok < 2:
            return img.sum() * 0.0
        img, spot, props = img[ok], spot[ok], props[ok]
        prop_emb = self.net.proportion_tower(props)
        align = (
            self.aligns["proportion_image"](prop_emb, img)
            + self.aligns["proportion_expression"](prop_emb, spot)
        ) / 2
        log_q = F.log_softmax(self.net.proportion_head(img), dim=-1)
        neg_entropy = torch.where(
            props > 0, props * torch.log(props.clamp(min=1e-12)), torch.zeros_like(props)
        ).sum(-1)
        # the mean over the whole batch's usable rows, of which this process holds some (or none); the caller
        # weighs a process's loss by its share of the batch, len(ok) / len(every)
        kl = (neg_entropy - (props * log_q).sum(-1)).sum() * (len(every) / (n_ok * len(ok)))
        return cfg.celltype_weight * align + cfg.proportion_head_weight * kl

    # ------------------------------------------------------------------ training
    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        """``unlabelled``: image-only spots (no expression) that join the histology term only."""
        cfg = self.config
        props, ok = self._proportions(train) or (None, None)
        X = torch.from_numpy(self.scaler(train.features))
        Y = torch.from_numpy(train.targets.astype(np.float32))
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bank = self.negative_bank(train, gen)
        log = TrainLog()
        if props is not None and self.dims.get("programmes", 0) + self.dims.get("reference", 0):
            log.selection["celltypes"] = self.celltypes_record  # fitted on these training spots: the model card

        # histology pool: training spots first, then unlabelled ones; neighbours within each sample
        pool_sets = [train] + ([unlabelled] if unlabelled is not None and len(unlabelled) else [])
        if cfg.histology_transfer:
            pool = torch.from_numpy(np.concatenate([self.scaler(s.features) for s in pool_sets]))
            coords = np.concatenate([s.coords_um for s in pool_sets])
            sids = np.concatenate([np.asarray(s.sample_ids).astype(str) for s in pool_sets])
            index_np, valid_np = spatial_neighbours(
                coords, sids, cfg.histology_neighbours, cfg.histology_max_distance_um
            )
            index, valid = torch.from_numpy(index_np), torch.from_numpy(valid_np)
            n_train, n_pool = len(train), len(pool)
            if cfg.histology_pretrain_epochs:
                pre = cfg.train.model_copy(update={"epochs": cfg.histology_pretrain_epochs})
                tower = nn.ModuleDict(
                    {"image": self.net.image_tower, "projector": self.net.histology_projector}
                )
                pre_log = fit_minibatches(
                    tower,
                    n_pool,
                    lambda idx: self._histology_loss(pool, index, valid, idx, gen),
                    pre,
                    cfg.seed + 2,
                )
                log.curves["pretrain_loss"] = pre_log.curves.get("train_loss", [])
                log.seconds += pre_log.seconds

        def refresh() -> None:
            self.net.eval()
            with torch.no_grad():
                bank.refresh(self.net.image_tower(X), self.net.expression_tower(Y))

        def step(idx: torch.Tensor) -> torch.Tensor:
            img = self.net.image_tower(X[idx])
            spot = self.net.expression_tower(Y[idx])
            loss = self.aligns["image_expression"](img, spot, bank, idx)
            if props is not None:
                loss = loss + self._celltype_loss(img, spot, props[idx], ok[idx])
            if cfg.histology_transfer and cfg.histology_weight > 0:
                rows = idx
                if n_pool > n_train:  # as many unlabelled anchors as labelled ones
                    extra = n_train + torch.randint(n_pool - n_train, (len(idx),), generator=gen)
                    rows = torch.cat([idx, extra])
                loss = loss + cfg.histology_weight * self._histology_loss(pool, index, valid, rows, gen)
            return loss

        module = nn.ModuleDict({"net": self.net, "aligns": self.aligns})
        joint = fit_minibatches(module, len(train), step, cfg.train, cfg.seed, self.validation(train, val),
                                None if bank is None else refresh)
        log.curves |= joint.curves
        log.best_epoch, log.seconds, log.epoch_seconds = joint.best_epoch, log.seconds + joint.seconds, joint.epoch_seconds
        return log

    def validation_score(self, train: SpotSet, spots: ValidationSpots) -> float:
        """Both of CarHE's outputs count: the expression Pearson, averaged with the mean per-type Pearson
        of the predicted cell-type proportions when the validation spots carry proportions, each taken
        within a validation sample and averaged over the samples. Non-finite predictions of either are the
        worst score."""
        expression = super().validation_score(train, spots)
        val, key = spots.scored, self.proportion_key
        if expression == WORST_VALIDATION_SCORE or not self.dims.get("n_types") or key not in val.extras:
            return expression
        truth, ok = clean_proportions(val.extras[key])
        if ok.sum() < 3:
            return expression
        try:
            r = mean_sample_pearson(self.predict_proportions(val.subset(ok)), truth[ok], val.sample_ids[ok])
        except He2stError:
            return WORST_VALIDATION_SCORE
        return (expression + r) / 2 if np.isfinite(r) else expression

    def embed_images(self, spots: SpotSet) -> np.ndarray:
        """Image embeddings from the frozen features alone (the query side of retrieval)."""
        return self.embed_frozen(self.net.image_tower, spots).numpy()

    @torch.no_grad()
    def predict_proportions(self, spots: SpotSet) -> np.ndarray:
        """Cell-type proportions ``(N, C)`` predicted from the images (rows sum to 1)."""
        if not self.dims.get("n_types"):
            raise He2stError("carhe was trained without cell-type transfer (celltype_transfer=false)")
        return torch.softmax(self.net.proportion_head(self.embed_frozen(self.net.image_tower, spots)), dim=-1).numpy()

    def _predict(self, spots: SpotSet) -> Prediction:
        prediction = super()._predict(spots)
        if self.dims.get("n_types"):
            prediction.extras[self.proportion_key] = self.predict_proportions(spots)
        return prediction
