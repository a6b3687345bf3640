"""Figures and a self-contained HTML report for he2st predictions (maps, metrics, uncertainty)."""

from he2st.report.html import build_report
from he2st.report.plots import expression_maps, pair_with_measured, plot_prediction

__all__ = ["build_report", "expression_maps", "pair_with_measured", "plot_prediction"]
