"""Spatial context and other views of a spot as a property of the features, for every method.

Context from the image alone: the mean embedding of the spot's ``k`` physically nearest spots of the
same slide (what NH2ST's neighbour branch and query-time averaging read), and the spot's other views
(:mod:`he2st.data.views`): the field 3x the spot's around it (TRIPLEX's global view), its sub-spot
tiles at cell scale, or another encoder's embedding of the same patch. They are appended to the spot's
own embedding, so a method sees ``[spot | neighbour mean | view ...]`` and learns how much to use each.
Whether a method uses them, and how many neighbours, are options (``context_neighbours``,
``context_field``, ``views``) that the ensemble chooses by cross-validation over training patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from he2st.data.spots import SpotSet
from he2st.data.views import FIELD, describe, how_to_make
from he2st.errors import He2stError
from he2st.methods.layers.neighbourhood import neighbour_sum


def neighbour_mean(features: np.ndarray, coords_um: np.ndarray, sample_ids: np.ndarray, k: int) -> np.ndarray:
    """Mean embedding of each spot's ``k`` nearest other spots of its sample (its own when it has none)."""
    total, count = neighbour_sum(features, coords_um, sample_ids, k)
    mean = np.where(count > 0, total / np.maximum(count, 1), features)
    return mean.astype(np.float32)


def feature_views(field: bool, views: Sequence[str]) -> list[str]:
    """The views a method appends, in order, each once: the field first when ``context_field`` is on."""
    return list(dict.fromkeys(([FIELD] if field else []) + list(views)))


def with_context(spots: SpotSet, neighbours: int, views: Sequence[str], method: str = "method") -> SpotSet:
    """``spots`` with their features widened by the requested context (unchanged when none is)."""
    if not neighbours and not views:
        return spots
    parts = [spots.features]
    if neighbours:
        parts.append(neighbour_mean(spots.features, spots.coords_um, spots.sample_ids, neighbours))
    for view in views:
        if view not in spots.views:
            raise He2stError(f"{method} reads {describe(view)} (view {view!r}), but these spots have no such "
                             f"embeddings: {how_to_make(view)}")
        parts.append(spots.views[view])
    return replace(spots, features=np.concatenate(parts, axis=1).astype(np.float32))


def context_width(neighbours: int, views: Sequence[str]) -> int:
    """How many embedding blocks the contextual features span (1: the spot alone)."""
    return 1 + bool(neighbours) + len(views)


def views_width(spots: SpotSet, views: Sequence[str]) -> int:
    """How many feature columns ``views`` add to ``spots`` (those the spots lack count 0: reading them fails)."""
    return sum(spots.views[v].shape[1] for v in views if v in spots.views)
