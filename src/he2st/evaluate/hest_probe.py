"""HEST-Benchmark's linear probe and split score, step for step, so its row is comparable with HEST's table.

What mahmoodlab/HEST runs for one split (``src/hest/bench/benchmark.py``, ``predict_single_split``;
``src/hest/bench/trainer.py``, ``train_test_reg``; ``src/hest/bench/st_dataset.py``, ``load_adata``;
``bench_config/bench_config.yaml`` sets ``dimreduce: "PCA"``; ``--latent_dim`` 256, ``--seed`` 1):

1. targets: ``log1p`` of the raw counts of the task's genes (``normalize=True``), float64;
2. ``Pipeline([StandardScaler(), PCA(n_components=256, random_state=seed)])`` fitted on the training
   embeddings, applied to both, and cast to float32 (``torch.Tensor(...)``). sklearn does not take a
   torch dtype for a numpy one and converts those tensors to float64, so the ridge below runs in float64 on
   float32-rounded features (fitting the float32 arrays instead moves split scores by ~1e-4);
3. ``Ridge(solver="lsqr", alpha=100 / (n_components * n_genes), random_state=seed, fit_intercept=False,
   max_iter=1000)``;
4. per gene, ``scipy.stats.pearsonr`` over all the split's test spots pooled; the split score is the
   plain mean over genes (a NaN gene makes it NaN, as ``np.mean`` does there).

Across splits HEST reports the mean and ``np.std`` (ddof 0) of split scores (``merge_fold_results``).
One deviation: when there are fewer training spots or embedding dimensions than 256, sklearn's PCA
would refuse; here the components are cut to that number and the caller is told.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

HEST_SEED = 1
HEST_LATENT_DIM = 256


def hest_targets(counts: np.ndarray) -> np.ndarray:
    """HEST's ``normalize=True`` targets: ``log1p`` of raw counts, float64."""
    return np.log1p(np.asarray(counts, dtype=np.float64))


@dataclass
class ProbeResult:
    """Test predictions of the probe and the PCA width it used (256 unless the data were smaller)."""

    predictions: np.ndarray
    n_components: int
    alpha: float


def hest_ridge(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int = HEST_SEED,
               latent_dim: int = HEST_LATENT_DIM) -> ProbeResult:
    """Scaler -> PCA -> float32 -> ridge, fitted on training spots; predictions for ``x_test``."""
    n_components = min(latent_dim, x_train.shape[0], x_train.shape[1])
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_components, random_state=seed))])
    # float32 as torch.Tensor rounds them, then float64 as sklearn reads a torch tensor
    z_train = np.asarray(pipe.fit_transform(x_train), dtype=np.float32).astype(np.float64)
    z_test = np.asarray(pipe.transform(x_test), dtype=np.float32).astype(np.float64)
    alpha = 100 / (z_train.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
    reg.fit(z_train, y_train)
    return ProbeResult(reg.predict(z_test), n_components, alpha)


def hest_split_score(predictions: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """The split score (mean over genes of the pooled per-gene Pearson r) and the per-gene values (NaN for a
    gene constant in either array; the caller counts them rather than scipy warning once per gene)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        per_gene = np.array([pearsonr(truth[:, g], predictions[:, g])[0] for g in range(truth.shape[1])],
                            np.float64)
    return float(np.mean(per_gene)), per_gene
