"""Evaluation: per-gene metrics, gene sets chosen on training data, and result tables.

``metrics`` scores one held-out sample, ``gene_sets`` picks the gene sets to average over
(on training spots only, so the test data never influences what is scored), ``scoring``
aggregates samples into folds and folds into a summary, ``tables`` renders it as markdown and
``results`` writes the result files. ``beyond_panel`` scores whole-transcriptome and cell-type
predictions.
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
from he2st.evaluate.results import write_results
from he2st.evaluate.scoring import FoldResult, average_results, evaluate_fold, summarise, summarise_extra
from he2st.evaluate.tables import extra_markdown, to_markdown

__all__ = [
    "FoldResult",
    "SampleScores",
    "average_results",
    "build_gene_sets",
    "evaluate_fold",
    "evaluate_sample",
    "extra_markdown",
    "gene_gene_correlation_preservation",
    "mae_per_gene",
    "mse_per_gene",
    "pearson_per_gene",
    "pearson_per_spot",
    "spearman_per_gene",
    "summarise",
    "summarise_extra",
    "test_sample_gene_sets",
    "to_markdown",
    "top_expressed",
    "top_variable",
    "write_results",
]
