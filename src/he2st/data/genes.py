"""Gene panels and regression targets, fitted on training samples only.

A :class:`GenePanel` records everything that was learned from data -- which genes and how counts are
transformed -- so that exactly the same mapping can be applied to held-out or new samples. Fitting
it on anything but a fold's training samples is leakage. Targets and predictions are always on the
panel's transform (``log1p_cp10k`` by default); methods that standardise genes internally map their
predictions back to it (their ``standardize_targets`` option).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from he2st.errors import He2stError

if TYPE_CHECKING:  # annotations only: reading a model card needs no anndata
    import anndata as ad

Transform = Literal["log1p_cp10k", "log1p"]
Selection = Literal["heg", "hvg", "given"]


def transform_counts(counts: sp.spmatrix | np.ndarray, kind: Transform) -> sp.csr_matrix:
    """Counts -> target scale. ``log1p_cp10k``: library size from *all* genes of the spot, then
    counts per 10,000 and log1p (the scanpy default); ``log1p``: log1p of raw counts (HEST-Benchmark)."""
    matrix = sp.csr_matrix(counts, dtype=np.float32)
    if kind == "log1p_cp10k":
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        totals[totals == 0] = 1.0
        matrix = sp.csr_matrix(sp.diags(1e4 / totals) @ matrix, dtype=np.float32)
    elif kind != "log1p":
        raise He2stError(f"unknown target transform {kind!r}; use 'log1p_cp10k' or 'log1p'")
    matrix.data = np.log1p(matrix.data)
    return matrix


class GeneConfig(BaseModel):
    """How the gene panel is chosen on the training samples."""

    model_config = ConfigDict(extra="forbid")

    n_genes: int = Field(250, gt=0, description="genes in the panel")
    selection: Literal["heg", "hvg"] = Field(
        "heg", description="heg: the highest mean expression; hvg: the highest variance")
    transform: Literal["log1p_cp10k", "log1p"] = Field(
        "log1p_cp10k", description="targets: log1p of counts per 10,000, or log1p of raw counts")
    min_spot_fraction: float = Field(
        0.1, ge=0, le=1, description="candidate genes are detected in at least this share of training spots")


class GenePanel(BaseModel):
    """The genes a model predicts and how their targets are computed."""

    genes: list[str]
    transform: Transform = "log1p_cp10k"
    selection: Selection = "heg"
    fitted_on: list[str] = Field(default_factory=list, description="sample ids the panel was fitted on")
    min_spot_fraction: float = 0.1
    missing: Literal["error", "zero"] = "error"

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def fit(
        cls,
        adatas: dict[str, ad.AnnData],
        n_genes: int = 250,
        selection: Selection = "heg",
        transform: Transform = "log1p_cp10k",
        min_spot_fraction: float = 0.1,
        genes: Sequence[str] | None = None,
        missing: Literal["error", "zero"] = "error",
    ) -> GenePanel:
        """Choose genes from the *training* samples ``adatas`` (sample id -> counts AnnData).

        Candidates are genes measured in every training sample and detected (count > 0) in at least
        ``min_spot_fraction`` of the pooled training spots; ``heg`` keeps the ``n_genes`` with the
        highest mean target value, ``hvg`` those with the highest variance. Ties break by name.
        """
        if not adatas:
            raise He2stError("cannot fit a gene panel on zero training samples")
        common = None
        for adata in adatas.values():
            names = set(adata.var_names)
            common = names if common is None else common & names
        if genes is not None:
            absent = [g for g in genes if g not in common]
            if absent:
                raise He2stError(f"{len(absent)} requested gene(s) not measured in every training sample: {absent[:5]}")
            candidates = list(genes)
            selection = "given"
        else:
            candidates = sorted(common)
        pooled = _pooled_targets(adatas, candidates, transform)
        detected = np.asarray((pooled > 0).mean(axis=0)).ravel()
        if selection != "given":
            keep = detected >= min_spot_fraction
            if selection in ("heg", "hvg"):
                mean, variance = _column_moments(pooled)
                score = mean if selection == "heg" else variance
            else:
                raise He2stError(f"unknown gene selection {selection!r}; use 'heg', 'hvg' or pass genes")
            order = sorted(np.flatnonzero(keep), key=lambda i: (-score[i], candidates[i]))[:n_genes]
            if len(order) < n_genes:
                raise He2stError(
                    f"only {len(order)} genes pass the detection filter (>= {min_spot_fraction:.0%} of spots); "
                    f"asked for {n_genes} (--set genes.n_genes=N asks for fewer, genes.min_spot_fraction lowers the "
                    "filter)"
                )
            chosen = [candidates[i] for i in order]
            pooled = pooled[:, order]
        else:
            chosen = candidates
        panel = cls(
            genes=chosen,
            transform=transform,
            selection=selection,
            fitted_on=sorted(adatas),
            min_spot_fraction=min_spot_fraction,
            missing=missing,
        )
        return panel

    @classmethod
    def from_config(cls, adatas: dict[str, ad.AnnData], config) -> GenePanel:
        """Fit with the settings of a :class:`GeneConfig` (training samples only)."""
        return cls.fit(adatas, n_genes=config.n_genes, selection=config.selection, transform=config.transform,
                       min_spot_fraction=config.min_spot_fraction)

    def targets(self, adata: ad.AnnData, where: str | Path | None = None) -> np.ndarray:
        """Target matrix (n_spots, n_genes) float32 for any sample, with this panel's mapping."""
        index = {g: i for i, g in enumerate(adata.var_names)}
        absent = [g for g in self.genes if g not in index]
        if absent and self.missing == "error":
            raise He2stError(
                f"{len(absent)} of the model's {self.n_genes} genes are not in this sample "
                f"(e.g. {', '.join(absent[:5])}); the model cannot be applied to this gene set",
                where,
            )
        full = transform_counts(adata.X, self.transform)
        out = np.zeros((adata.n_obs, self.n_genes), dtype=np.float32)
        present = [i for i, g in enumerate(self.genes) if g in index]
        out[:, present] = full[:, [index[self.genes[i]] for i in present]].toarray()
        return out


def _column_moments(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (ddof=0) of each column, accumulated in float64 around the mean.

    The pooled targets are float32, and scipy sums a float32 matrix in float32: over thousands of spots
    ``E[x^2] - E[x]^2`` then loses the variance of a highly expressed gene to round-off (a gene constant
    at log1p 5.3 would outrank one that varies), so HVG and near-tied HEG picks would depend on it.
    """
    n_rows, n_cols = matrix.shape
    values = matrix.data.astype(np.float64)
    mean = np.bincount(matrix.indices, weights=values, minlength=n_cols) / n_rows
    centred = np.bincount(matrix.indices, weights=(values - mean[matrix.indices]) ** 2, minlength=n_cols)
    zeros = n_rows - np.bincount(matrix.indices, minlength=n_cols)  # implicit zeros lie mean away from it
    return mean, (centred + zeros * mean**2) / n_rows


def _pooled_targets(adatas: dict[str, ad.AnnData], genes: list[str], transform: Transform) -> sp.csr_matrix:
    blocks = []
    for adata in adatas.values():
        full = transform_counts(adata.X, transform)
        index = {g: i for i, g in enumerate(adata.var_names)}
        blocks.append(full[:, [index[g] for g in genes]])
    return sp.vstack(blocks).tocsr()
