"""Baselines under the same interface: the HEST-Benchmark ridge probe, ST-Net-style MLP
regression on frozen features, and image-to-image kNN.

Fitted parameters are kept as arrays (not sklearn objects) so checkpoints stay tensor-only.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, KFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from he2st.data.splits import held_out_groups
from he2st.data.spots import SpotSet
from he2st.methods.base import Method, Prediction, TrainLog
from he2st.methods.configs.baselines import KNNConfig, MLPConfig, RidgeConfig, RidgeCVConfig
from he2st.methods.layers.bank import ReferenceBank
from he2st.methods.layers.features import FeatureScaler, clean_proportions
from he2st.methods.neural import NeuralMethod
from he2st.methods.registry import register_method
from he2st.methods.training import TrainConfig, fit_minibatches
from he2st.stats import mean_sample_pearson


def ridge_path(X: np.ndarray, Y: np.ndarray, X_new: np.ndarray, alphas: np.ndarray,
               fit_intercept: bool) -> list[np.ndarray]:
    """Ridge predictions for ``X_new`` at every alpha, from one SVD of ``X`` (exact, as sklearn's
    ``solver="svd"``): coefficients ``V diag(s / (s^2 + alpha)) U^T Y``."""
    x_mean = X.mean(0) if fit_intercept else np.zeros(X.shape[1])
    y_mean = Y.mean(0) if fit_intercept else np.zeros(Y.shape[1])
    U, s, Vt = np.linalg.svd(X - x_mean, full_matrices=False)
    UtY = U.T @ (Y - y_mean)
    Xv = (X_new - x_mean) @ Vt.T
    return [Xv @ ((s / (s**2 + alpha))[:, None] * UtY) + y_mean for alpha in alphas]


@register_method
class RidgeProbe(Method):
    """HEST-Benchmark's linear probe: StandardScaler, PCA to 256 components, Ridge.

    StandardScaler -> PCA -> Ridge (lsqr), exactly as HEST-Benchmark's probe."""

    name = "ridge"
    Config = RidgeConfig
    stochastic = False

    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        data = train if val is None else SpotSet.concat([train, val])  # no early stopping: use all training spots
        X, Y = data.features, data.targets
        scaler = StandardScaler().fit(X)
        n_comp = min(self.config.pca_components, X.shape[0], X.shape[1])
        pca = PCA(n_components=n_comp, svd_solver="full").fit(scaler.transform(X))  # exact: seed-independent
        Z = pca.transform(scaler.transform(X))
        alpha = self.config.alpha if self.config.alpha is not None else 100.0 / (n_comp * Y.shape[1])
        log = TrainLog()
        if self.config.alpha_cv:
            alpha = self._cv_alpha(Z, Y, self.training_groups(data), data.sample_ids, log)
        ridge = Ridge(alpha=alpha, fit_intercept=self.config.fit_intercept, solver="lsqr", max_iter=1000,
                      random_state=self.config.seed).fit(Z, Y)
        self.arrays = {
            "scale_mean": scaler.mean_, "scale_std": scaler.scale_, "pca_mean": pca.mean_,
            "pca_components": pca.components_, "coef": ridge.coef_,
            "intercept": np.broadcast_to(np.asarray(ridge.intercept_, dtype=np.float64), (Y.shape[1],)).copy(),
            "alpha": np.array([alpha]),
        }
        key = self.config.celltype_key
        if key and key in data.extras:
            props, ok = clean_proportions(data.extras[key])
            fit = Ridge(alpha=100.0 / (n_comp * props.shape[1]), solver="lsqr", max_iter=1000,
                        random_state=self.config.seed).fit(Z[ok], props[ok])
            self.arrays |= {"proportion_coef": fit.coef_, "proportion_intercept": fit.intercept_}
        log.add(alpha=alpha)
        return log

    def __init__(self, config: RidgeConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.arrays: dict[str, np.ndarray] = {}  # fitted scaler, PCA and ridge parameters

    @property
    def feature_dim(self) -> int | None:
        return len(self.arrays["scale_mean"]) if self.arrays else None

    def _cv_alpha(self, Z: np.ndarray, Y: np.ndarray, groups: np.ndarray, samples: np.ndarray,
                  log: TrainLog) -> float:
        """Inner CV over the training spots only, each inner fold holding out whole ``groups`` (the training
        patients, or samples: :meth:`training_groups`, so that a patient's sections never sit on both sides of
        a fold), scored per held-out sample as the benchmark scores; spots are split only when there is one
        group. Each inner fold takes one SVD of its training features, which gives the exact ridge solution
        for every candidate alpha at once."""
        groups, samples = np.asarray(groups).astype(str), np.asarray(samples).astype(str)
        n_groups = len(np.unique(groups))
        if n_groups >= 2:
            splits = list(GroupKFold(n_splits=min(5, n_groups)).split(Z, Y, groups))
        else:
            splits = list(KFold(5, shuffle=True, random_state=0).split(Z, Y))
        alphas = np.asarray(self.config.alphas, np.float64)
        fold_scores = np.zeros((len(splits), len(alphas)))
        for f, (tr, te) in enumerate(splits):
            for a, pred in enumerate(ridge_path(Z[tr], Y[tr], Z[te], alphas, self.config.fit_intercept)):
                fold_scores[f, a] = mean_sample_pearson(pred, Y[te], samples[te])
        scores = np.nanmean(fold_scores, axis=0)
        for score in scores:
            log.add(cv_pearson=float(score))
        return float(alphas[int(np.nanargmax(scores))])

    def _predict(self, spots: SpotSet) -> Prediction:
        a = self.arrays
        Z = ((spots.features - a["scale_mean"]) / a["scale_std"] - a["pca_mean"]) @ a["pca_components"].T
        pred = Z @ a["coef"].T + a["intercept"]
        prediction = Prediction(pred.astype(np.float32), list(self.panel.genes))
        if "proportion_coef" in a:
            props = Z @ a["proportion_coef"].T + a["proportion_intercept"]
            prediction.extras[self.config.celltype_key] = clean_proportions(props)[0]
        return prediction

    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}

    def load_state(self, state: dict[str, torch.Tensor], layout: dict) -> None:
        self.arrays = {k: v.numpy() for k, v in state.items()}


@register_method
class RidgeCV(RidgeProbe):
    """The ridge probe with alpha chosen by inner cross-validation over training patients, and an intercept.

    The intercept is HEST-Benchmark PR #140's fix."""

    name = "ridge_cv"

    Config = RidgeCVConfig


class SeedAverage(nn.Module):
    """The mean output of several networks (``active``: one of them alone, while it trains)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is not None:
            return self.models[self.active](x)
        return torch.stack([model(x) for model in self.models]).mean(dim=0)


@register_method
class MLPRegressor(NeuralMethod):
    """ST-Net-style regression: an MLP from frozen image features to every panel gene; the mean of several seeds.

    MSE loss; the mean of ``n_models`` such networks from different seeds."""

    name = "mlp"
    Config = MLPConfig
    scales_targets = True

    def input_components(self) -> int | None:
        return self.config.pca_components

    def _network(self, dims: dict[str, int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        d_in = dims.get("input_dim", dims["image_dim"])
        for h in self.config.hidden:
            layers += [nn.Linear(d_in, h), nn.GELU(), nn.Dropout(self.config.dropout)]
            d_in = h
        return nn.Sequential(*layers, nn.Linear(d_in, dims["n_genes"]))

    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        self.net = SeedAverage([self._network(dims) for _ in range(self.config.n_models)])

    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        spots = train if val is None else SpotSet.concat([train, val])
        groups = self.training_groups(spots)
        if self.config.epochs_by == "validation" or len(set(groups)) < 2:  # scalers stay fitted on train
            logs = [self._fit_member(k, train, self.validation(train, val), self.config.train)
                    for k in range(self.config.n_models)]
        else:
            epochs, mean_curve = self._inner_cv_epochs(spots, groups)  # chosen once, with the first seed
            # the final fits train on every training spot, validation ones included: so are the scalers fitted
            # (axes fitted without a training patient's validation section score lower: docs/methods/mlp.md)
            self.fit_scalers(spots)
            self.dims = self.sizes(spots)
            final = self.config.train.model_copy(update={"epochs": epochs})
            logs = [self._fit_member(k, spots, None, final) for k in range(self.config.n_models)]
            for member in logs:
                member.best_epoch = epochs - 1
            logs[0].curves["inner_val_pearson"] = mean_curve.tolist()
        self.net.active = None
        log = logs[0]  # the first network's curves; every network's epoch count is in the selection
        log.selection["epochs"] = [member.best_epoch + 1 for member in logs]
        log.epoch_seconds = [sum(times) for times in zip(*(member.epoch_seconds for member in logs))]  # all networks
        return log

    def _inner_cv_epochs(self, spots: SpotSet, groups: np.ndarray) -> tuple[int, np.ndarray]:
        """The epoch count of the first network's best mean validation curve over the training patients,
        each held out in turn (scalers and axes fitted on each inner training part, never on its held-out
        patient), and that mean curve."""
        curves = []
        for fold in held_out_groups(groups, self.config.inner_folds):
            test = np.isin(groups.astype(str), fold)
            inner_train, held = spots.subset(~test), spots.subset(test)
            self.fit_scalers(inner_train)
            self.dims = self.sizes(inner_train)
            curve = self._fit_member(0, inner_train, self.validation(inner_train, held), self.config.train)
            curves.append(curve.curves["val_pearson"])
        depth = max(map(len, curves))
        mean_curve = np.mean([c + c[-1:] * (depth - len(c)) for c in curves], axis=0)  # stopped folds hold their last
        return int(np.argmax(mean_curve)) + 1, mean_curve

    def _fit_member(self, k: int, spots: SpotSet, validate, train: TrainConfig) -> TrainLog:
        """A fresh network ``k`` (seed ``seed + k``) trained on ``spots`` with the current scalers; while it
        trains, the model predicts with it alone."""
        self.net.active = k
        torch.manual_seed(self.config.seed + k)
        self.net.models[k] = self._network(self.dims)
        return self._regress(k, spots, validate, train)

    def _regress(self, k: int, spots: SpotSet, validate, train: TrainConfig) -> TrainLog:
        X = torch.from_numpy(self.scaler(spots.features))
        Y = torch.from_numpy(spots.targets if self.target_scaler is None else self.target_scaler(spots.targets))
        network = self.net.models[k]

        def step(idx: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(network(X[idx]), Y[idx])

        return fit_minibatches(network, len(X), step, train, self.config.seed + k, validate)

    @torch.no_grad()
    def _predict(self, spots: SpotSet) -> Prediction:
        self.net.eval()
        pred = self.net(torch.from_numpy(self.scaler(spots.features))).numpy()
        if self.target_scaler is not None:
            pred = pred * self.target_scaler.std + self.target_scaler.mean
        return Prediction(pred.astype(np.float32), list(self.panel.genes))


@register_method
class ImageKNN(Method):
    """Image-to-image retrieval: the expression of the training spots that look most alike.

    Cosine on standardised frozen features, the spots found within each training slide and the slides
    averaged with an equal say (``per_sample``). The no-learning reference point for BLEEP."""

    name = "knn"
    Config = KNNConfig
    stochastic = False
    uses_bank = True
    retrieves = True
    query_options = ("per_sample", "smooth_neighbours")
    ablations = {"pooled_retrieval": {"per_sample": False}}

    def __init__(self, config: KNNConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.scaler = FeatureScaler()

    @property
    def feature_dim(self) -> int | None:
        return None if self.scaler.mean is None else len(self.scaler.mean)

    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        data = train if val is None else SpotSet.concat([train, val])
        self.scaler = FeatureScaler().fit(data.features)
        self.bank = ReferenceBank(self.scaler(data.features), data.targets, data.genes, list(data.sample_ids))
        return TrainLog()

    def transcriptome_reference(self, spots: SpotSet, expression: np.ndarray, genes: list[str]) -> ReferenceBank:
        features = self.scaler(self.contextual(spots).features)
        return ReferenceBank(features, self.level_free(expression, spots.sample_ids), genes, list(spots.sample_ids))

    def retrieve(self, spots: SpotSet, bank: ReferenceBank) -> Prediction:
        self.check_spots(spots)
        return self.smoothed(self._retrieve(self.contextual(spots.without_expression()), bank), spots)

    def _predict(self, spots: SpotSet) -> Prediction:
        return self._retrieve(spots, self.bank)

    def _retrieve(self, spots: SpotSet, bank: ReferenceBank) -> Prediction:
        """Retrieval for spots whose features carry the context."""
        result = bank.predict(self.scaler(spots.features), k=min(self.config.top_k, len(bank)),
                              weighting=self.config.weighting, per_sample=self.config.per_sample)
        return Prediction(result.expression, result.genes,
                          {"best_similarity": result.best_similarity, "dispersion": result.dispersion})

    def state(self) -> dict[str, torch.Tensor]:
        return self.scaler.state()

    def load_state(self, state: dict[str, torch.Tensor], layout: dict) -> None:
        self.scaler = FeatureScaler.from_state(state)
