"""Evaluation: per-gene metrics, gene sets chosen on training data, and result tables.

``metrics`` scores one held-out sample, ``gene_sets`` picks the gene sets to average over
(on training spots only, so the test data never influences what is scored), and ``tables``
aggregates samples into folds and folds into a summary written to disk.
"""

from he2st.evaluate.gene_sets import build_gene_sets, test_sample_gene_sets, top_expressed, top_variable
from he2st.evaluate.metrics import (
    SampleScores,
    evaluate_sample,
    gene_gene_correlation_preservation,
    mae_per_gene,
    mse_per_gene,
    pearson_per_gene,
    pearson_per_spot,
    spearman_per_gene,
)
from he2st.evaluate.tables import FoldResult, evaluate_fold, summarise, to_markdown, write_results

__all__ = [
    "FoldResult",
    "SampleScores",
    "build_gene_sets",
    "evaluate_fold",
    "evaluate_sample",
    "gene_gene_correlation_preservation",
    "mae_per_gene",
    "mse_per_gene",
    "pearson_per_gene",
    "pearson_per_spot",
    "spearman_per_gene",
    "summarise",
    "test_sample_gene_sets",
    "to_markdown",
    "top_expressed",
    "top_variable",
    "write_results",
]
