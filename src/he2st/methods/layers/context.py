"""Spatial context as a property of the features, for every method.

Two kinds of context, both from the image alone: the mean embedding of the spot's ``k`` physically
nearest spots of the same slide (what NH2ST's neighbour branch and query-time averaging read), and
the embedding of a field 3x the spot's around it (TRIPLEX's global view; cut by ``he2st prepare`` and
embedded by ``he2st embed`` like the spot itself). They are appended to the spot's own embedding, so
a method sees ``[spot | neighbour mean | field]`` and learns how much to use each. Whether a method
uses them, and how many neighbours, are options (``context_neighbours``, ``context_field``) that the
ensemble chooses by cross-validation over training patients.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.layers.neighbourhood import neighbour_sum


def neighbour_mean(features: np.ndarray, coords_um: np.ndarray, sample_ids: np.ndarray, k: int) -> np.ndarray:
    """Mean embedding of each spot's ``k`` nearest other spots of its sample (its own when it has none)."""
    total, count = neighbour_sum(features, coords_um, sample_ids, k)
    mean = np.where(count > 0, total / np.maximum(count, 1), features)
    return mean.astype(np.float32)


def with_context(spots: SpotSet, neighbours: int, field: bool, method: str = "method") -> SpotSet:
    """``spots`` with their features widened by the requested context (unchanged when none is)."""
    if not neighbours and not field:
        return spots
    parts = [spots.features]
    if neighbours:
        parts.append(neighbour_mean(spots.features, spots.coords_um, spots.sample_ids, neighbours))
    if field:
        if spots.field_features is None:
            raise He2stError(
                f"{method} reads the context field around each spot (context_field), but these spots have no "
                "context-field embeddings: prepare with context_field on (the default) and re-run `he2st embed`")
        parts.append(spots.field_features)
    return replace(spots, features=np.concatenate(parts, axis=1).astype(np.float32))


def context_width(neighbours: int, field: bool) -> int:
    """How many embedding widths the contextual features span."""
    return 1 + bool(neighbours) + bool(field)
