"""The named signature scores a fitted model measures on its inner folds, so that calls made from its
predictions (``he2st tls``, ``he2st localize``) can be judged on the score itself.

Each is a per-spot score of one section's values (spots x genes, on the model's target scale) and the number
of the signature's genes it used, or None when the genes hold less than half of the signature's weight --
the share under which ``he2st tls`` and ``he2st localize`` refuse to call at all.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from he2st.errors import He2stError
from he2st.evaluate.localisation import SIGNATURE_SOURCES as LOCALISATION_SIGNATURES
from he2st.evaluate.localisation import read_signature, signature_score
from he2st.evaluate.tls import SIGNATURE_SOURCES as TLS_SIGNATURES
from he2st.evaluate.tls import TlsScore, tls_score
from he2st.methods.calibration import SectionScore
from he2st.workflows.tls import MIN_WEIGHT_COVERAGE, read_model


def signature_scores(scale: str) -> dict[str, SectionScore]:
    """Every named TLS and localisation signature readable here (her2st's TLS models need its dataset)."""
    scores: dict[str, SectionScore] = {}
    for name in TLS_SIGNATURES:
        try:
            scores[name] = partial(_covered, score=partial(tls_score, model=read_model(name), scale=scale))
        except He2stError:
            continue
    for name in LOCALISATION_SIGNATURES:  # scored on the log scale the model predicts
        scores[name] = partial(_covered, score=partial(signature_score, signature=read_signature(name)))
    return scores


def _covered(values: np.ndarray, genes: list[str],
             score: Callable[..., TlsScore]) -> tuple[np.ndarray, list[str]] | None:
    """The score and the genes it used, or None when the genes hold too little of the signature's weight."""
    try:
        scored = score(values, genes)
    except He2stError:
        return None
    return (scored.score, list(scored.genes)) if scored.weight_coverage >= MIN_WEIGHT_COVERAGE else None
