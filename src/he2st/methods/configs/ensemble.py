"""Options of the ensemble: its members and how their weights and context are chosen."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field

from he2st.methods.configs.common import MethodConfig


class EnsembleConfig(MethodConfig):
    """Members, their options, and how their weights are chosen (on training patients only)."""

    members: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "knn": {"method": "knn"},
            "bleep": {"method": "bleep", "context_neighbours": 0},
            "ridge_cv": {"method": "ridge_cv"},
            "carhe": {"method": "carhe", "context_neighbours": 0},
        },
        description="member label -> {method: registered name, other keys: that method's options}")
    candidates: list[str | dict[str, Any]] | Literal["registered"] = Field(
        "registered", description="methods also tried on the inner folds when they select: names or specs, or every "
        "registered one within cost_budget")
    cost_budget: float | None = Field(
        20.0, ge=0, description="most fitting seconds per 1,000 training spots (as docs/methods lists them) of a "
        "'registered' candidate; null: any")
    context: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}, {"context_neighbours": 6}, {"context_neighbours": 6, "context_field": True},
                                 {"within_sample": True}],
        description="context options (neighbours, field, views, within_sample) tried on inner folds for each member not "
        "setting them")
    view_variants: list[str] | Literal["embedded"] = Field(
        "embedded", description="views tried, each as one more context variant of each member whose context is open: "
        "these, or every view embedded")
    query_neighbours: list[int] = Field(
        default_factory=lambda: [0, 6],
        description="query-time neighbour counts tried on each fitted retrieval member whose spec does not set them")
    smoothing: list[int] = Field(
        default_factory=lambda: [0, 6],
        description="spatial smoothing (k nearest spots' predictions) tried on inner folds for each member not setting it")
    weights: Literal["auto", "global", "per_gene", "equal"] = Field(
        "auto", description="members' combination: 'global' or 'per_gene' stacking, 'equal'; 'auto': 'global' given "
        "min_selection_folds")
    min_selection_folds: int = Field(
        3, ge=2, validation_alias=AliasChoices("min_selection_folds", "min_stacking_folds"),
        description="inner folds needed before inner scores choose a context variant or stacked weights")
    scale_within: Literal["sample", "inner"] = Field(
        "sample", description="members' per-gene scale: standardised within each predicted 'sample', or fixed on "
        "'inner' folds")
    inner_folds: int = Field(
        3, ge=2, le=10, description="most inner folds (training patients, or samples, are dealt into at most this many)")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="share of each inner training set held out for the members' early stopping")
