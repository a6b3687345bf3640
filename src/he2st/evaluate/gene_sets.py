"""Gene sets to average scores over, chosen without looking at the test data.

Papers in this field often report "HEG" (highly expressed) and "HVG" (highly variable)
genes picked on the held-out test sample itself. That selects genes on the very spots that
are then scored, which favours genes whose test-sample pattern happens to be strong and
makes numbers incomparable across splits. The default sets here are picked on the pooled
training spots only; ``test_sample_gene_sets`` exists solely to reproduce published numbers
and labels its sets as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from he2st.errors import He2stError

__all__ = ["build_gene_sets", "test_sample_gene_sets", "top_expressed", "top_variable"]


def _top_by(scores: np.ndarray, genes: Sequence[str], n: int) -> list[str]:
    """The ``n`` genes with the highest score; equal scores are ordered by gene name so the
    selection never depends on panel order or sort stability."""
    order = sorted(range(len(genes)), key=lambda i: (-scores[i], genes[i]))
    return [genes[i] for i in order[:n]]


def _checked(expr: np.ndarray, genes: Sequence[str], n: int) -> np.ndarray:
    """Return ``expr`` as a finite float matrix matching ``genes``, with room for ``n`` genes."""
    x = np.asarray(expr, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(genes):
        raise He2stError(f"expression matrix of shape {x.shape} does not match {len(genes)} gene names")
    if x.shape[0] == 0:
        raise He2stError("expression matrix has no spots to select genes from")
    if not np.isfinite(x).all():
        raise He2stError("expression matrix contains non-finite values (NaN or inf)")
    if not 1 <= n <= len(genes):
        raise He2stError(f"cannot pick {n} genes from a panel of {len(genes)} (--set n_top=N sets the genes of each "
                         "gene set, genes.n_genes the panel)")
    return x


def top_expressed(expr: np.ndarray, genes: Sequence[str], n: int = 50) -> list[str]:
    """HEG: the ``n`` genes with the highest mean of ``expr`` (spots x genes, as transformed
    for training), ties broken by gene name."""
    x = _checked(expr, genes, n)
    return _top_by(x.mean(axis=0), list(genes), n)


def top_variable(expr: np.ndarray, genes: Sequence[str], n: int = 50) -> list[str]:
    """HVG: the ``n`` genes with the highest variance of ``expr`` across spots, ties broken by
    gene name."""
    x = _checked(expr, genes, n)
    return _top_by(x.var(axis=0), list(genes), n)


def build_gene_sets(
    train_expr: np.ndarray,
    genes: Sequence[str],
    markers: Sequence[str] | None = None,
    n: int = 50,
) -> dict[str, list[str]]:
    """The default evaluation sets, chosen on training spots only.

    ``train_expr`` is the pooled matrix of the fold's training spots (never a test sample).
    Returns ``{"all", f"heg{n}", f"hvg{n}"}`` plus ``"markers"`` when markers are given;
    markers must all be in the panel (duplicates are dropped, order kept), because a marker
    set that silently shrinks would no longer be the set the user asked for.
    """
    genes = list(genes)
    sets: dict[str, list[str]] = {
        "all": genes,
        f"heg{n}": top_expressed(train_expr, genes, n),
        f"hvg{n}": top_variable(train_expr, genes, n),
    }
    if markers is not None:
        wanted = list(dict.fromkeys(markers))
        panel = set(genes)
        missing = [g for g in wanted if g not in panel]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise He2stError(f"{len(missing)} marker gene(s) are not in the panel: {shown}")
        if not wanted:
            raise He2stError("marker gene list is empty")
        sets["markers"] = wanted
    return sets


def test_sample_gene_sets(test_expr: np.ndarray, genes: Sequence[str], n: int = 50) -> dict[str, list[str]]:
    """HEG/HVG chosen on the held-out test sample, as BLEEP and CMRCNet report them.

    For comparison with published numbers only. Selecting genes on the spots being scored
    leaks test information into the evaluation, so these sets are named
    ``*_testselected`` and must not be used as a headline result.
    """
    return {
        f"heg{n}_testselected": top_expressed(test_expr, genes, n),
        f"hvg{n}_testselected": top_variable(test_expr, genes, n),
    }


# The name starts with "test_"; stop pytest from collecting it when a test module imports it.
test_sample_gene_sets.__test__ = False  # type: ignore[attr-defined]
